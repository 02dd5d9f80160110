"""Tests for the pure parts of vae_dist.checkpoint: rotation policy and manifest checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vae_dist.checkpoint import FORMAT, MANIFEST, TMP_PREFIX, Checkpointer, read_manifest, rotation_plan

# --- rotation_plan -------------------------------------------------------------------------


def test_keeps_newest_by_step_not_by_name():
    # Lexically "step-9" > "step-100" > "step-10"; by step it is the oldest.
    complete = {"step-9": 9, "step-10": 10, "step-100": 100}
    assert rotation_plan(complete, 2) == ["step-9"]
    assert sorted(rotation_plan(complete, 1)) == ["step-10", "step-9"]


def test_step_comes_from_the_value_not_the_name():
    complete = {"zzz": 1, "aaa": 3, "mmm": 2}
    assert rotation_plan(complete, 1) == ["mmm", "zzz"]


def test_keep_larger_than_count_deletes_nothing():
    complete = {"a": 1, "b": 2}
    assert rotation_plan(complete, 2) == []
    assert rotation_plan(complete, 5) == []
    assert rotation_plan({}, 1) == []


def test_keep_one_of_many():
    complete = {f"step-{s:09d}": s for s in (5, 50, 500, 1, 7)}
    assert sorted(rotation_plan(complete, 1)) == sorted(f"step-{s:09d}" for s in (5, 50, 1, 7))


def test_ties_keep_lexically_last_name():
    complete = {"a": 5, "b": 5, "c": 3}
    assert sorted(rotation_plan(complete, 1)) == ["a", "c"]
    assert rotation_plan(complete, 2) == ["c"]
    assert rotation_plan(complete, 3) == []


def test_rotation_plan_is_pure():
    complete = {"a": 1, "b": 2, "c": 3}
    copy = dict(complete)
    assert rotation_plan(complete, 1) == rotation_plan(complete, 1)
    assert complete == copy


# --- read_manifest -------------------------------------------------------------------------


def _make_checkpoint(folder: Path, step: int = 10, **overrides) -> dict:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"m" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "rng.pkl").write_bytes(b"r" * 7)
    manifest = {
        "format": FORMAT,
        "global_step": step,
        "files": {"model.safetensors": 100, "sub/rng.pkl": 7},
        "sha256": {
            "model.safetensors": hashlib.sha256(b"m" * 100).hexdigest(),
            "sub/rng.pkl": hashlib.sha256(b"r" * 7).hexdigest(),
        },
        "state": {
            "epoch": 1, "batches_done": 3, "global_step": step, "train_sums": [0.0, 0.0, 0.0, 0.0],
            "history": [{"epoch": 1}], "wandb_run_id": None, "num_processes": 1,
        },
    }
    manifest.update(overrides)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_valid_manifest_is_returned(tmp_path):
    m = _make_checkpoint(tmp_path / "ck")
    assert read_manifest(tmp_path / "ck") == m


def test_missing_manifest(tmp_path):
    _make_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / MANIFEST).unlink()
    assert read_manifest(tmp_path / "ck") is None
    assert read_manifest(tmp_path / "no-such-folder") is None


def test_size_mismatch_truncated_file(tmp_path):
    _make_checkpoint(tmp_path / "ck")
    with open(tmp_path / "ck" / "model.safetensors", "r+b") as f:
        f.truncate(50)
    assert read_manifest(tmp_path / "ck") is None


def test_listed_file_missing(tmp_path):
    _make_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "sub" / "rng.pkl").unlink()
    assert read_manifest(tmp_path / "ck") is None


@pytest.mark.parametrize("fmt", [FORMAT + 1, 0, None, "1"])
def test_wrong_format_number(tmp_path, fmt):
    _make_checkpoint(tmp_path / "ck", format=fmt)
    assert read_manifest(tmp_path / "ck") is None


def test_invalid_json(tmp_path):
    _make_checkpoint(tmp_path / "ck")
    text = (tmp_path / "ck" / MANIFEST).read_text()
    (tmp_path / "ck" / MANIFEST).write_text(text[: len(text) // 2])
    assert read_manifest(tmp_path / "ck") is None


@pytest.mark.parametrize(
    "overrides",
    [{"global_step": "ten"}, {"state": 5}, {"files": [1, 2]}],
    ids=["step-not-int", "state-not-dict", "files-not-dict"],
)
def test_malformed_fields(tmp_path, overrides):
    _make_checkpoint(tmp_path / "ck", **overrides)
    assert read_manifest(tmp_path / "ck") is None


def test_manifest_not_an_object(tmp_path):
    _make_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / MANIFEST).write_text("[1, 2, 3]")
    assert read_manifest(tmp_path / "ck") is None


# --- Checkpointer.complete (no accelerator needed to list) -----------------------------------


def test_complete_lists_intact_newest_first_by_manifest_step(tmp_path):
    d = tmp_path / "checkpoints"
    _make_checkpoint(d / "step-000000020", step=20)
    _make_checkpoint(d / "step-000000100", step=100)
    # The name says 999 but the manifest says 5: the manifest wins.
    _make_checkpoint(d / "step-000000999", step=5)
    _make_checkpoint(d / f"{TMP_PREFIX}step-000000200", step=200)  # unfinished: ignored
    broken = d / "step-000000300"
    _make_checkpoint(broken, step=300)
    (broken / "model.safetensors").write_bytes(b"short")  # size mismatch: ignored
    (d / "step-000000400").mkdir()  # no manifest: ignored
    found = Checkpointer(None, d, keep=2).complete()  # type: ignore[arg-type]
    assert [(f.path.name, f.global_step) for f in found] == [
        ("step-000000100", 100),
        ("step-000000020", 20),
        ("step-000000999", 5),
    ]
    assert found[0].state["global_step"] == 100


def test_complete_on_missing_folder(tmp_path):
    assert Checkpointer(None, tmp_path / "none", keep=1).complete() == []  # type: ignore[arg-type]
