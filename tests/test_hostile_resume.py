"""Hostile resumes and model files, in process on synthetic data: a hand-edited checkpoint
position is skipped for the older checkpoint, --max-steps at or below the checkpoint's
step is handled, and a model file's config cannot make the loader allocate a huge model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_learner import _learner as learner_on_synthetic_images

from vae_dist import artifacts
from vae_dist.checkpoint import MANIFEST
from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError, CheckpointError, ConfigError
from vae_dist.learner import Learner
from vae_dist.model import VAE


def _learner(root: Path, log: list[str], *, resume: bool = False, **overrides) -> Learner:
    return learner_on_synthetic_images(root, resume=resume, log=log.append, **overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One epoch with a checkpoint every 4 steps: step-000000008 (mid-epoch) and step-000000010 kept."""
    root = tmp_path_factory.mktemp("run")
    _learner(root, [], epochs=1, checkpoint_every_steps=4).fit()
    assert sorted(p.name for p in (root / artifacts.CHECKPOINTS).iterdir()) == ["step-000000008", "step-000000010"]
    return root


def _copy(run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(run, root)
    return root


def _edit_state(folder: Path, edit) -> None:
    # The manifest is not among the hashed files, so editing it leaves the hashes right.
    m = json.loads((folder / MANIFEST).read_text())
    edit(m["state"])
    (folder / MANIFEST).write_text(json.dumps(m))


EDITS = {
    "batches_done missing": lambda s: s.pop("batches_done"),
    "unknown key": lambda s: s.update(foo=1),
    "history row without epoch": lambda s: s.update(history=[{}]),
    "train_sums a string": lambda s: s.update(train_sums="abc"),
    "train_sums too short": lambda s: s.update(train_sums=[1]),
    "train_sums not finite": lambda s: s.update(train_sums=[float("nan"), 0, 0, 0]),
    "epoch without its history": lambda s: s.update(epoch=5),
    "num_processes a string": lambda s: s.update(num_processes="1"),
    "wandb_run_id a number": lambda s: s.update(wandb_run_id=3),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_edited_position_falls_back_to_the_older_checkpoint(finished_run, tmp_path, edit):
    root = _copy(finished_run, tmp_path)
    _edit_state(root / artifacts.CHECKPOINTS / "step-000000010", edit)
    log: list[str] = []
    learner = _learner(root, log, resume=True, epochs=1)
    learner.fit()
    assert any("step-000000010 is unusable" in line for line in log), log
    assert learner.position.global_step == 10  # the rest of the epoch, from step 8
    assert [r["step"] for r in learner.position.history] == [10]


def test_batches_done_beyond_the_epoch_is_refused(finished_run, tmp_path):
    root = _copy(finished_run, tmp_path)
    _edit_state(root / artifacts.CHECKPOINTS / "step-000000010", lambda s: s.update(batches_done=1_000_000))
    learner = _learner(root, [], resume=True, epochs=2)
    with pytest.raises(CheckpointError, match=r"step-000000010.*1000000 batches into an epoch of 10"):
        learner.fit()
    assert learner.position.global_step == 0


@pytest.fixture
def preempted(finished_run, tmp_path) -> Path:
    """A run stopped mid-way through its first epoch: its newest checkpoint has no history."""
    root = _copy(finished_run, tmp_path)
    shutil.rmtree(root / artifacts.CHECKPOINTS / "step-000000010")
    (root / artifacts.METRICS).unlink()
    return root


def test_max_steps_below_the_checkpoint_is_refused_before_writing(preempted):
    before = sorted(str(p) for p in preempted.rglob("*"))
    learner = _learner(preempted, [], resume=True, epochs=1, max_steps=5)
    with pytest.raises(ConfigError, match=r"--max-steps 5 .*step 8"):
        learner.fit()
    assert sorted(str(p) for p in preempted.rglob("*")) == before


def test_max_steps_at_the_checkpoint_ends_that_partial_epoch(preempted):
    learner = _learner(preempted, [], resume=True, epochs=1, max_steps=8)
    learner.fit()
    (row,) = learner.position.history
    assert (row["epoch"], row["step"], row["complete_epoch"]) == (1, 8, False)
    assert row["train/samples"] == 8 * 32  # the carried sums of the 8 steps done
    assert [json.loads(line)["step"] for line in (preempted / artifacts.METRICS).read_text().splitlines()] == [8]
    # The next resume, with more steps, finishes the epoch from there.
    again = _learner(preempted, [], resume=True, epochs=1)
    again.fit()
    assert [(r["step"], r["complete_epoch"]) for r in again.position.history] == [(10, True)]


HUGE = {"kind": "mlp", "hidden_sizes": [16384, 16384, 12000]}  # about 956M parameters, under the cap


def test_model_file_declaring_a_huge_model_is_refused_unallocated(tmp_path, monkeypatch):
    tiny = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    p = tmp_path / artifacts.MODEL
    artifacts.save_model_file(p, VAE.from_config(tiny.model).state_dict(), TrainingConfig.from_dict({"model": HUGE}))
    built = VAE.from_config

    def from_config(config):
        # Allocating the declared model for real would take gigabytes.
        assert config.hidden_sizes != HUGE["hidden_sizes"] or torch.empty(0).device.type == "meta"
        return built(config)

    monkeypatch.setattr(VAE, "from_config", staticmethod(from_config))
    with pytest.raises(ArtifactError, match=r"does not match its config: decoder\..* has shape"):
        artifacts.load_model_file(p)


def test_compiled_model_names_still_load(tmp_path):
    cfg = TrainingConfig.from_dict({"model": {"kind": "conv", "latent_size": 3}})
    model = VAE.from_config(cfg.model)
    p = tmp_path / artifacts.MODEL
    # What a torch.compile'd model's state_dict names look like, as older files may hold them.
    artifacts.save_model_file(p, {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, cfg)
    loaded, _ = artifacts.load_model_file(p)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
