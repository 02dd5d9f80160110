"""The offline W&B run a training records: its config, each epoch's metrics (as in
metrics.jsonl, the KL warm-up's weight included) and pictures, each at the epoch's step,
the final and best valid/loss in its summary, and the model as an artifact; a resumed
training continues the same W&B run.

One short training (2 epochs on a slice, W&B offline into a private WANDB_DIR, KL warm-up
over both epochs), then its resumption for a third epoch, run in this process; W&B runs
its own service process beside it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import check_ok, cli_env, main_in_process, run_cli, small_train_args
from vae_dist.run.modelfile import model_results
from vae_dist.run.folder import read_metrics

EPOCHS = 2
PREVIEW_WIDTH = 8 * 30 + 2  # 8 tiles of 28 pixels, 2 between and around them


# W&B's transaction log (run-<id>.wandb) is a LevelDB-style log: a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a header
# (crc32 seeded by the chunk type, length, type) and FULL/FIRST/MIDDLE/LAST types that
# join into serialized `Record` protobufs. wandb 0.31 ships no Python reader (the
# writer lives in wandb-core), so this is the reader.
_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the tail of a block too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero fill: nothing more in this block
            pos += left
            continue
        data = raw[pos + _HEADER : pos + _HEADER + length]
        assert len(data) == length, f"truncated chunk at byte {pos}"
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += _HEADER + length
        if kind == _FULL:
            whole = data
        elif kind == _FIRST:
            pending = data
            continue
        elif kind == _MIDDLE:
            pending += data
            continue
        elif kind == _LAST:
            whole, pending = pending + data, b""
        else:
            raise AssertionError(f"unknown chunk type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """Each history record as {key: value}; nested keys (an image's fields) join with '/'."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.mark.slow
def test_offline_wandb_run(data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    art, wandb_dir = tmp_path / "run", tmp_path / "wandb-home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where an artifact is staged
    args = small_train_args(data_dir, art, "--model", "mlp", "--epochs", str(EPOCHS), "--wandb-mode", "offline",
                            "--kl-warmup-epochs", str(EPOCHS))
    ran = main_in_process(args, capsys)
    check_ok(ran)
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    run_id = run.name.rsplit("-", 1)[1]
    assert f"id {run_id}" in ran.stdout and f"wandb sync {run}" in ran.stdout
    assert not (art / "wandb").exists(), "WANDB_DIR is honoured"

    logs = list(run.glob("run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"]
    records = list(wandb_records(logs[0]))
    assert {"run", "config", "history"} <= {r.WhichOneof("record_type") for r in records}

    metrics = read_metrics(art)
    weights = [m["train/kl_weight"] for m in metrics]
    assert 0 < weights[0] < weights[1] == pytest.approx(1.0)  # warm-up over all epochs ends at the full weight
    epoch_rows = [r for r in history_rows(records) if "valid/loss" in r]
    assert [r["_step"] for r in epoch_rows] == [m["step"] for m in metrics]
    for logged, saved in zip(epoch_rows, metrics):
        for key in ("train/loss", "valid/loss", "valid/recon", "valid/kl", "valid/active_units", "train/lr",
                    "samples_per_second", "train/kl_weight", "epoch_seconds"):
            assert logged[key] == pytest.approx(saved[key]), key
        for key in ("valid/reconstructions", "prior/samples"):  # the epoch's pictures, at the epoch's step
            assert logged[f"{key}/_type"] == "image-file"
            # the reconstructions' rows are labelled in a margin on their left
            assert (logged[f"{key}/width"] > PREVIEW_WIDTH) == (key == "valid/reconstructions")
            assert (run / "files" / logged[f"{key}/path"]).is_file()
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2 * EPOCHS

    config: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    saved_config = json.loads((art / "config.json").read_text())
    assert config["epochs"] == EPOCHS and config["wandb_mode"] == "offline"
    for key in saved_config:
        assert config[key] == saved_config[key], key

    summary = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}
    losses = [m["valid/loss"] for m in metrics]
    assert summary["final/valid/loss"] == pytest.approx(losses[-1])
    assert summary["best/valid/loss"] == pytest.approx(min(losses))
    assert summary["best/step"] == metrics[losses.index(min(losses))]["step"]

    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert (artifact.type, artifact.name) == ("model", f"model-{run_id}")
    assert json.loads(artifact.metadata) == {"config": saved_config, "results": model_results(art / "model.safetensors")}
    (entry,) = artifact.manifest.contents
    md5 = base64.b64encode(hashlib.md5((art / "model.safetensors").read_bytes()).digest()).decode()
    assert (entry.path, entry.digest) == ("model.safetensors", md5)

    # Resumed for one more epoch: the same W&B run goes on (a second offline folder, same id).
    check_ok(main_in_process([*args, "--resume", "--epochs", str(EPOCHS + 1)], capsys))
    later = sorted(set((wandb_dir / "wandb").glob("offline-run-*")) - {run})
    assert [p.name.rsplit("-", 1)[1] for p in later] == [run_id]
    (resumed,) = [r.run for r in wandb_records(later[0] / f"run-{run_id}.wandb") if r.WhichOneof("record_type") == "run"]
    assert resumed.run_id == run_id


@pytest.mark.slow
@pytest.mark.parametrize("asked", [{}, {"WANDB_SILENT": "false"}], ids=["default", "WANDB_SILENT=false"])
def test_wandb_prints_its_own_lines_only_when_asked(data_dir: Path, tmp_path: Path, asked: dict) -> None:
    # A default run without an account: vae_dist's lines name the offline run and its sync command;
    # W&B's own (about 30) only when the user asks for them.
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_DATA_DIR=str(tmp_path / "data"), **asked)
    if not asked:
        del env["WANDB_SILENT"]
    ran = run_cli(small_train_args(data_dir, tmp_path / "run", "--model", "mlp", "--max-steps", "2",
                                   "--wandb-mode", "offline"), env=env)
    check_ok(ran)
    theirs = [line for line in (ran.stdout + ran.stderr).splitlines() if line.startswith("wandb:")]
    assert "W&B offline run folder:" in ran.stdout and "wandb sync" in ran.stdout
    assert bool(theirs) == bool(asked), theirs
