"""vae_dist.run.checkpoint without training: rotation (of this run's checkpoints only), which
folders are complete checkpoints (the manifest's and the position's schemas, a run id that is
never a path), and a failed write."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import SafetensorError

from vae_dist.run.checkpoint import FORMAT, MANIFEST, TMP_PREFIX, Checkpointer, read_manifest, rotation_plan
from vae_dist.config import TrainingConfig
from vae_dist.errors import CheckpointError
from vae_dist.run.position import Position

R1, OTHER = "00000001", "0000000f"  # run ids


def test_rotation_keeps_the_newest_by_step_not_by_name():
    # Lexically "step-9" > "step-100" > "step-10"; by step it is the oldest.
    complete = {"step-9": 9, "step-10": 10, "step-100": 100}
    assert rotation_plan(complete, 2) == ["step-9"]
    assert sorted(rotation_plan(complete, 1)) == ["step-10", "step-9"]
    assert rotation_plan(complete, 3) == rotation_plan(complete, 5) == []


def test_rotation_ties_keep_the_lexically_last_name():
    assert sorted(rotation_plan({"a": 5, "b": 5, "c": 3}, 1)) == ["a", "c"]


# --- which folders are complete ------------------------------------------------------------

ROW = {
    "epoch": 1, "step": 10, "complete_epoch": True, "train/loss": 1.0, "train/recon": 0.5, "train/kl": 0.5,
    "train/samples": 320, "valid/loss": 1.0, "valid/recon": 0.5, "valid/kl": 0.5, "valid/active_units": 2,
    "valid/samples": 100, "train/lr": 1e-3, "train/kl_weight": 1.0, "epoch_seconds": 0.1, "valid_seconds": 0.0,
    "samples_per_second": 1e4, "protocol": {"data": "grey-level MNIST", "train_kl_weight": 0.5, "test_images": 100},
}


def _make_checkpoint(folder: Path, step: int = 13, run_id: str = R1) -> dict:
    """A folder as a save of run ``run_id`` leaves it: two files, and a manifest 3 batches into epoch 2."""
    files = {"model.safetensors": b"m" * 100, "sub/rng.pkl": b"r" * 7}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    state = {"epoch": 1, "batches_done": step - 10, "global_step": step, "train_sums": [3.0, 2.0, 1.0, 96.0],
             "history": [copy.deepcopy(ROW)], "wandb_run_id": "abc", "num_processes": 1,
             "config": TrainingConfig().to_dict()}
    manifest = {
        "format": FORMAT, "global_step": step, "run_id": run_id,
        "files": {rel: len(data) for rel, data in files.items()},
        "sha256": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()},
        "state": state,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_a_complete_checkpoint_is_read_back(tmp_path):
    m = _make_checkpoint(tmp_path)
    assert read_manifest(tmp_path).model_dump() == m


def _do(change):
    """An edit made in place; the others return the manifest to write."""
    return lambda m: (change(m), m)[1]


def _in_state(**changes):
    return _do(lambda m: m["state"].update(changes))


def _in_row(**changes):
    return _do(lambda m: m["state"]["history"][0].update(changes))


def _unlink(rel):
    return lambda m, folder: (folder / rel).unlink()


def _outside(folder: Path) -> Path:
    """A file outside the checkpoint with sub/rng.pkl's bytes: only the path can tell."""
    (folder.parent / "outside").write_bytes((folder / "sub/rng.pkl").read_bytes())
    return folder.parent / "outside"


def _listed_as(rel):
    def damage(m, folder):
        _outside(folder)
        m["files"][rel(folder)] = m["files"].pop("sub/rng.pkl")
        m["sha256"][rel(folder)] = m["sha256"].pop("sub/rng.pkl")
    return damage


def _linked(m, folder):
    outside = _outside(folder)
    (folder / "sub/rng.pkl").unlink()
    (folder / "sub/rng.pkl").symlink_to(outside)


UNUSABLE = {
    # the manifest
    "a list": lambda m: [1, 2, 3],
    "format 1 (sizes only)": lambda m: {**m, "format": 1},
    "an older format": lambda m: {**m, "format": FORMAT - 1},
    "a newer format": lambda m: {**m, "format": FORMAT + 1},
    "no run id": lambda m: {k: v for k, v in m.items() if k != "run_id"},
    "a run id that is a path": lambda m: {**m, "run_id": "/../../../x"},
    "a run id of another shape": lambda m: {**m, "run_id": "0000000F"},
    "a run id with a newline": lambda m: {**m, "run_id": R1 + "\n"},
    "format true": lambda m: {**m, "format": True},
    "unknown key": lambda m: {**m, "extra": 1},
    "step a string": lambda m: {**m, "global_step": "ten"},
    "step negative": lambda m: {**m, "global_step": -13},
    "files a list": lambda m: {**m, "files": [1, 2]},
    "no files": lambda m: {**m, "files": {}, "sha256": {}},
    "a negative size": _do(lambda m: m["files"].update({"model.safetensors": -1})),
    "a size nested": _do(lambda m: m["files"].update({"model.safetensors": {"b": [1]}})),
    "no hashes": lambda m: {k: v for k, v in m.items() if k != "sha256"},
    "a hash missing": _do(lambda m: m["sha256"].pop("sub/rng.pkl")),
    "a hash not hex": _do(lambda m: m["sha256"].update({"sub/rng.pkl": "z" * 64})),
    "state not an object": lambda m: {**m, "state": 5},
    "state of another step": lambda m: {**m, "global_step": 12},
    # the position
    "batches_done missing": _do(lambda m: m["state"].pop("batches_done")),
    "unknown position key": _in_state(foo=1),
    "batches_done true": _in_state(batches_done=True),
    "train_sums too short": _in_state(train_sums=[1.0]),
    "no processes": _in_state(num_processes=0),
    "wandb_run_id a number": _in_state(wandb_run_id=3),
    "epoch without its history": _in_state(epoch=5),
    "steps that do not add up": _in_state(batches_done=2),
    "a row without epoch": _do(lambda m: m["state"]["history"][0].pop("epoch")),
    "a row of another epoch": _in_row(epoch=2),
    "two epochs in progress": _do(lambda m: m["state"]["history"].extend(
        [{**m["state"]["history"][0], "epoch": e, "step": 10 + e, "complete_epoch": False} for e in (2, 3)])),
    "a loss a string": _in_row(**{"valid/loss": "low"}),
    "a finished epoch not complete": _in_row(complete_epoch=False),
    "a protocol that is a list": _in_row(protocol=[]),
    "a config the trainer refuses": _do(lambda m: m["state"]["config"].update(seed=-1)),
}
# Edits of the text itself (non-finite numbers and nesting are not what json.dumps writes).
UNUSABLE_TEXT = {
    "train_sums not finite": lambda text: text.replace("[3.0, 2.0, 1.0, 96.0]", "[NaN, 2.0, 1.0, 96.0]"),
    "cut short": lambda text: text[: len(text) // 2],
    "not UTF-8": lambda text: "\udcff" + text,
    "deeply nested": lambda text: "[" * 100_000 + "]" * 100_000,
}
UNUSABLE_FOLDER = {
    "no manifest": _unlink(MANIFEST),
    "a listed file missing": _unlink("sub/rng.pkl"),
    "a truncated file": lambda m, folder: os.truncate(folder / "model.safetensors", 50),
    "a listed file that is a link": _linked,
    "a path leaving the folder": _listed_as(lambda folder: "../outside"),
    "an absolute path": _listed_as(lambda folder: str(folder.parent / "outside")),
}


@pytest.mark.parametrize("edit", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_edited_manifest_is_unusable_not_a_crash(edit, tmp_path):
    m = _make_checkpoint(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(edit(m)))
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("edit", UNUSABLE_TEXT.values(), ids=UNUSABLE_TEXT.keys())
def test_an_unreadable_manifest_is_unusable(edit, tmp_path):
    _make_checkpoint(tmp_path)
    text = edit((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("damage", UNUSABLE_FOLDER.values(), ids=UNUSABLE_FOLDER.keys())
def test_a_damaged_folder_is_unusable(damage, tmp_path):
    folder = tmp_path / "ck"
    m = _make_checkpoint(folder)
    damage(m, folder)
    if (folder / MANIFEST).exists():
        (folder / MANIFEST).write_text(json.dumps(m))
    assert read_manifest(folder) is None


def test_complete_lists_this_runs_intact_checkpoints_newest_first(tmp_path):
    d = tmp_path / "checkpoints"
    for name, step, run_id in [
        ("step-000000020", 20, R1), ("step-000000100", 100, R1), ("step-000000015-replaced", 15, R1),
        ("step-000000999", 15, R1),  # named after another step than its manifest's
        ("my-backup", 100, R1),  # a user's copy of one
        ("step-000000700", 700, OTHER),  # another run's
        (f"{TMP_PREFIX}step-000000200-{R1}", 200, R1), ("step-000000300", 300, R1),
    ]:
        _make_checkpoint(d / name, step, run_id)
    (d / "step-000000300" / "model.safetensors").write_bytes(b"short")  # size mismatch
    (d / "step-000000400").mkdir()  # no manifest
    (d / "step-000000500").symlink_to(d / "step-000000100", target_is_directory=True)  # not ours
    found = Checkpointer(None, d, keep=2, run_id=R1).complete()  # type: ignore[arg-type]
    assert [(f.path.name, f.manifest.state.global_step) for f in found] == [
        ("step-000000100", 100), ("step-000000020", 20), ("step-000000015-replaced", 15),
    ]
    assert Checkpointer(None, tmp_path / "none", keep=1, run_id=R1).complete() == []  # type: ignore[arg-type]


def test_a_full_disk_while_checkpointing_is_one_checkpoint_error(tmp_path, monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(acc, "save_state", full)
    ck = Checkpointer(acc, tmp_path / "checkpoints", keep=2, log=lambda _: None, run_id=R1)
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint .*\(the disk is full\)$"):
        ck.save(0, Position.start("abc", 1, TrainingConfig(), 3))
    assert not list((tmp_path / "checkpoints").iterdir())  # no debris


# --- saves and resumes with a stand-in for Accelerate's state files ---------------------------


class _Acc:
    """One process whose save_state writes one file and whose load_state reads nothing:
    enough for which folders a save makes, keeps and deletes."""

    num_processes, is_main_process = 1, True

    def save_state(self, output_dir: str, **kwargs) -> None:
        (Path(output_dir) / "model.safetensors").write_bytes(b"w" * 64)

    def load_state(self, path: str) -> None:
        pass

    def wait_for_everyone(self) -> None:
        pass


def _ck(d: Path, keep: int = 1, run_id: str = R1) -> Checkpointer:
    return Checkpointer(_Acc(), d, keep=keep, log=lambda _: None, run_id=run_id)  # type: ignore[arg-type]


def _save(ck: Checkpointer, step: int) -> Path:
    epoch0 = Position.start(ck.run_id, 1, TrainingConfig(), 3)
    return ck.save(step, epoch0.model_copy(update={"global_step": step, "batches_done": step}))


def test_a_diverged_metric_is_saved_as_json_null_and_read_back_as_nan(tmp_path):
    row = {**ROW, "valid/loss": float("nan"), "valid/kl": float("inf")}
    state = Position.start(R1, 1, TrainingConfig(), 3).model_copy(update={"epoch": 1, "global_step": 10,
                                                                          "history": [row]})
    path = _ck(tmp_path).save(10, state)
    json.loads((path / MANIFEST).read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    (read,) = read_manifest(path).state.history
    assert math.isnan(read["valid/loss"]) and math.isnan(read["valid/kl"]) and read["valid/recon"] == ROW["valid/recon"]


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    _save(_ck(d, keep=5), 1)
    shutil.copytree(d / "step-000000001", d / "my-backup")  # a user's copy, our manifest in it
    (d / "my-backup" / "NOTES.txt").write_text("mine")
    _save(_ck(d, keep=5, run_id=OTHER), 2)  # another run's
    _save(_ck(d, keep=1), 3)
    assert sorted(p.name for p in d.iterdir()) == ["my-backup", "step-000000002", "step-000000003"]
    assert (d / "my-backup" / "NOTES.txt").read_text() == "mine"


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path):
    d = tmp_path / "checkpoints"
    _save(_ck(d, run_id=OTHER), 8)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        _ck(d).load_latest()


def test_a_checkpoint_found_corrupt_is_never_counted_as_kept(tmp_path):
    d = tmp_path / "checkpoints"
    _save(_ck(d, keep=5), 20)
    _save(_ck(d, keep=5), 30)
    with open(d / "step-000000030" / "model.safetensors", "r+b") as f:  # same size, other bytes
        f.write(b"x")
    ck = _ck(d, keep=1)
    assert ck.load_latest().path.name == "step-000000020"
    _save(ck, 25)  # the resumed run saves below the corrupt newest
    assert sorted(p.name for p in d.iterdir()) == ["step-000000025"]
    assert _ck(d).load_latest().path.name == "step-000000025"


@pytest.mark.parametrize("at", ["save", "resume"])
def test_this_runs_unfinished_writes_are_removed_at_its_next_save_or_resume(tmp_path, at):
    d = tmp_path / "checkpoints"
    _save(_ck(d), 4)
    for run_id in (R1, OTHER, f"{R1}-mine", "x"):  # what a second Ctrl-C during a save leaves, and others
        (d / f"{TMP_PREFIX}step-000000006-{run_id}").mkdir()
    _save(_ck(d), 7) if at == "save" else _ck(d).load_latest()
    left = {p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)}
    assert left == {f"{TMP_PREFIX}step-000000006-{i}" for i in (OTHER, f"{R1}-mine", "x")}  # not this run's: left alone


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed\nunexpected pos 6272 vs 6160"),
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                    "\"No space left on device\" })"),
], ids=["torch", "safetensors"])
def test_a_full_disk_in_a_library_writer_is_one_checkpoint_error_without_debris(tmp_path, monkeypatch, error):
    def full(output_dir: str, **kwargs) -> None:
        (Path(output_dir) / "optimizer.bin").write_bytes(b"torn")
        raise error

    ck = _ck(tmp_path / "checkpoints")
    monkeypatch.setattr(ck.accelerator, "save_state", full)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=0))  # a full disk
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint .*\(the disk is full\)$") as e:
        _save(ck, 3)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "checkpoints").iterdir())  # no debris


def test_a_run_id_that_is_not_one_names_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a run id"):
        _ck(tmp_path / "checkpoints", run_id="../x")


def test_a_crafted_run_id_in_a_manifest_makes_an_unusable_checkpoint_never_a_path(tmp_path):
    d = tmp_path / "checkpoints"
    outside = tmp_path / "outside"
    (outside / "step-000000001").mkdir(parents=True)
    (outside / "step-000000001" / "thesis.tex").write_text("mine")
    _save(_ck(d, keep=5), 1)
    crafted = d / "step-000000001"
    manifest = json.loads((crafted / MANIFEST).read_text())
    (crafted / MANIFEST).write_text(json.dumps({**manifest, "run_id": f"/../../../{outside}"}))
    assert read_manifest(crafted) is None
    log: list[str] = []
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step-000000001"):
        Checkpointer(_Acc(), d, keep=1, log=log.append, run_id=R1).load_latest()  # type: ignore[arg-type]
    assert any("step-000000001 is unusable" in line for line in log)
    _save(_ck(d, keep=1), 2)  # rotation: the crafted one is nobody's, so it stays, and so does outside
    assert sorted(p.name for p in d.iterdir()) == ["step-000000001", "step-000000002"]
    assert (outside / "step-000000001" / "thesis.tex").read_text() == "mine"


def test_a_checkpoints_folder_that_is_a_link_is_refused_and_nothing_behind_it_deleted(tmp_path):
    outside = tmp_path / "outside"
    (outside / f"{TMP_PREFIX}step-000000006-{R1}").mkdir(parents=True)  # named as this run's leftover
    (tmp_path / "checkpoints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        _save(_ck(tmp_path / "checkpoints"), 7)
    assert [p.name for p in outside.iterdir()] == [f"{TMP_PREFIX}step-000000006-{R1}"]
