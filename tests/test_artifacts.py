"""Tests for vae_dist.artifacts: the artifact directory guard, the safetensors export and
metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vae_dist.artifacts import (
    CHECKPOINTS,
    CONFIG,
    IMAGES,
    MARKER,
    METRICS,
    MODEL,
    OWNED,
    load_model_file,
    prepare_artifact_dir,
    read_metrics,
    save_model_file,
    write_config,
    write_metrics,
)
from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError, VaeDistError
from vae_dist.model import VAE


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _fake_previous_run(root: Path) -> None:
    prepare_artifact_dir(root, overwrite=False, resume=False)
    write_config(root, TrainingConfig())
    write_metrics(root, [{"epoch": 1, "step": 10}])
    (root / MODEL).write_bytes(b"weights")
    (root / CHECKPOINTS / "step-000000010").mkdir(parents=True)
    (root / CHECKPOINTS / "step-000000010" / "MANIFEST.json").write_text("{}")
    (root / IMAGES).mkdir()
    (root / IMAGES / "epoch-001-samples.png").write_bytes(b"png")


# --- prepare_artifact_dir ------------------------------------------------------------------


def test_creates_missing_dir_with_marker(tmp_path):
    root = tmp_path / "a" / "b"
    out = prepare_artifact_dir(root, overwrite=False, resume=False)
    assert out == root and root.is_dir()
    assert (root / MARKER).is_file()
    assert json.loads((root / MARKER).read_text())["created_by"] == "vae_dist"
    # No probe or temp file is left behind.
    assert sorted(p.name for p in root.iterdir()) == [MARKER]


def test_empty_existing_dir_ok(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    prepare_artifact_dir(root, overwrite=False, resume=False)
    assert (root / MARKER).is_file()


def test_marked_dir_without_run_is_reusable(tmp_path):
    """A run that failed before writing anything leaves only the marker: no flags needed."""
    root = tmp_path / "r"
    prepare_artifact_dir(root, overwrite=False, resume=False)
    prepare_artifact_dir(root, overwrite=False, resume=False)
    assert (root / MARKER).is_file()


def test_previous_run_refused_without_flags(tmp_path):
    root = tmp_path / "run"
    _fake_previous_run(root)
    before = _snapshot(root)
    with pytest.raises(ArtifactError) as ei:
        prepare_artifact_dir(root, overwrite=False, resume=False)
    msg = str(ei.value)
    assert "--resume" in msg and "--overwrite" in msg and "\n" not in msg
    assert _snapshot(root) == before


def test_resume_keeps_previous_run(tmp_path):
    root = tmp_path / "run"
    _fake_previous_run(root)
    before = _snapshot(root)
    prepare_artifact_dir(root, overwrite=False, resume=True)
    assert _snapshot(root) == before


def test_overwrite_leaves_a_users_files_inside_the_owned_folders(tmp_path):
    root = tmp_path / "run"
    _fake_previous_run(root)
    (root / IMAGES / "my_notes.txt").write_text("mine")
    (root / CHECKPOINTS / "my_backup").mkdir()
    (root / CHECKPOINTS / "my_backup" / "f").write_text("k")
    prepare_artifact_dir(root, overwrite=True, resume=False)
    assert sorted(p.name for p in (root / IMAGES).iterdir()) == ["my_notes.txt"]
    assert sorted(p.name for p in (root / CHECKPOINTS).iterdir()) == ["my_backup"]
    assert (root / CHECKPOINTS / "my_backup" / "f").read_text() == "k"
    assert not (root / MODEL).exists()


@pytest.mark.parametrize("name, make", [
    (MODEL, lambda p: p.mkdir()),  # a folder where vae_dist writes a file
    (IMAGES, lambda p: p.write_text("x")),  # a file where vae_dist makes a folder
    (CONFIG, lambda p: os.mkfifo(p)),
])
def test_overwrite_refuses_an_entry_of_the_wrong_kind_before_deleting_anything(tmp_path, name, make):
    root = tmp_path / "run"
    _fake_previous_run(root)
    target = root / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    make(target)
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(ArtifactError, match="not what vae_dist writes"):
        prepare_artifact_dir(root, overwrite=True, resume=False)
    assert sorted(p.name for p in root.rglob("*")) == before


def test_overwrite_removes_only_own_entries(tmp_path):
    root = tmp_path / "run"
    _fake_previous_run(root)
    (root / "notes.txt").write_text("my notes")
    (root / "mine").mkdir()
    (root / "mine" / "keep.bin").write_bytes(b"\x00\x01")
    prepare_artifact_dir(root, overwrite=True, resume=False)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([MARKER, "notes.txt", "mine"])
    assert (root / "notes.txt").read_text() == "my notes"
    assert (root / "mine" / "keep.bin").read_bytes() == b"\x00\x01"
    for name in (CONFIG, METRICS, MODEL, CHECKPOINTS, IMAGES):
        assert name in OWNED and not (root / name).exists()


def test_foreign_dir_refused_even_with_overwrite(tmp_path):
    root = tmp_path / "foreign"
    root.mkdir()
    (root / "thesis.tex").write_text("important")
    # Names vae_dist would write, but the folder is not ours: they must survive too.
    (root / CONFIG).write_text('{"mine": true}')
    (root / CHECKPOINTS).mkdir()
    (root / CHECKPOINTS / "x.pt").write_bytes(os.urandom(64))
    before = _snapshot(root)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError) as ei:
            prepare_artifact_dir(root, overwrite=overwrite, resume=False)
        msg = str(ei.value)
        assert "not created by vae_dist" in msg and "\n" not in msg
        assert _snapshot(root) == before
    assert not (root / MARKER).exists()


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        prepare_artifact_dir(f, overwrite=False, resume=False)
    assert f.read_text() == "x"


def test_unwritable_dir_refused(tmp_path):
    """As root, chmod does not stop writes; so the parent is made a *file*, which fails
    for any user (mkdir under a file). As a normal user, a read-only folder is tried too."""
    parent = tmp_path / "parent"
    parent.write_text("not a folder")
    with pytest.raises(ArtifactError) as ei:
        prepare_artifact_dir(parent / "run", overwrite=False, resume=False)
    assert "not writable" in str(ei.value) and "\n" not in str(ei.value)

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ArtifactError, match="not writable"):
                prepare_artifact_dir(ro, overwrite=False, resume=False)
        finally:
            ro.chmod(0o700)


def test_overwrite_and_resume_together_refused(tmp_path):
    root = tmp_path / "run"
    _fake_previous_run(root)
    before = _snapshot(root)
    with pytest.raises(ArtifactError, match="together"):
        prepare_artifact_dir(root, overwrite=True, resume=True)
    assert _snapshot(root) == before


@pytest.mark.parametrize("state", ["missing", "empty", "marker-only"])
def test_resume_without_previous_run_refused(tmp_path, state):
    root = tmp_path / "run"
    if state == "empty":
        root.mkdir()
    elif state == "marker-only":
        prepare_artifact_dir(root, overwrite=False, resume=False)
    with pytest.raises(ArtifactError, match="no previous run"):
        prepare_artifact_dir(root, overwrite=False, resume=True)


def test_artifact_errors_are_user_errors():
    assert issubclass(ArtifactError, VaeDistError)


# --- model file ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, latent", [("conv", 8), ("mlp", 5)])
def test_model_file_round_trip_from_file_alone(tmp_path, kind, latent):
    cfg = TrainingConfig.from_dict({"model": {"kind": kind, "latent_size": latent}, "seed": 3, "epochs": 2})
    torch.manual_seed(0)
    model = VAE.from_config(cfg.model)
    # Perturb so that the weights are not just a fresh default init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    src = tmp_path / "src" / MODEL
    src.parent.mkdir()
    save_model_file(src, model.state_dict(), cfg)
    assert not list(src.parent.glob(".*tmp"))  # the temp file was renamed away

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(src, alone / MODEL)
    for where in (alone / MODEL, alone):  # the file or its folder
        loaded, loaded_cfg = load_model_file(where)
        assert loaded_cfg == cfg
        assert not loaded.training
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    x = torch.rand(2, 1, 28, 28)
    eps = torch.randn(2, latent)
    assert torch.equal(model.eval()(x, eps).logits, loaded(x, eps).logits)


def test_missing_model_file(tmp_path):
    with pytest.raises(ArtifactError, match="no trained model"):
        load_model_file(tmp_path)


def test_foreign_safetensors_refused(tmp_path):
    p = tmp_path / MODEL
    save_file({"w": torch.zeros(3)}, str(p), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not written by vae_dist"):
        load_model_file(p)


def test_garbage_file_refused(tmp_path):
    p = tmp_path / MODEL
    p.write_bytes(os.urandom(1000))
    with pytest.raises(ArtifactError) as ei:
        load_model_file(p)
    assert str(p) in str(ei.value)


def test_truncated_model_file_refused(tmp_path):
    cfg = TrainingConfig()
    p = tmp_path / MODEL
    save_model_file(p, VAE.from_config(cfg.model).state_dict(), cfg)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        load_model_file(p)


def test_model_file_with_mismatched_config_refused(tmp_path):
    cfg = TrainingConfig.from_dict({"model": {"kind": "conv", "latent_size": 8}})
    other = TrainingConfig.from_dict({"model": {"kind": "conv", "latent_size": 9}})
    p = tmp_path / MODEL
    save_model_file(p, VAE.from_config(cfg.model).state_dict(), other)
    with pytest.raises(ArtifactError, match="does not match"):
        load_model_file(p)


# --- metrics -------------------------------------------------------------------------------


def test_metrics_round_trip(tmp_path):
    rows = [
        {"epoch": 1, "step": 15, "train/loss": 210.5, "valid/loss": 190.25, "valid/samples": 500},
        {"epoch": 2, "step": 30, "train/loss": 150.0, "valid/loss": 140.125, "valid/samples": 500},
    ]
    write_metrics(tmp_path, rows)
    assert read_metrics(tmp_path) == rows
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    # Rewriting replaces (a resume from an older checkpoint does not duplicate epochs).
    write_metrics(tmp_path, rows[:1])
    assert read_metrics(tmp_path) == rows[:1]


def test_read_metrics_missing_is_empty(tmp_path):
    assert read_metrics(tmp_path) == []
