"""Learner.fit in process on a few hundred synthetic images: the loop trains, logs,
checkpoints, stops at max_steps and stops on a non-finite loss. ``_learner`` is also the
builder of test_resume's in-process resumes."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_dist.data import loaders
from vae_dist.run import folder
from vae_dist.run.checkpoint import Checkpointer
from vae_dist.config import TrainingConfig
from vae_dist.errors import TrainingError
from vae_dist.training.learner import Learner
from vae_dist.models import build
from vae_dist.run.position import Position
from vae_dist.training.tracking import Tracker
from vae_dist.training.trainer import make_optimizer

NUM_IMAGES = 320
CHECKPOINT_RUN_ID = "0123abcd"  # the id the checkpoints of every run built here are written with


def _images(n: int, seed: int) -> torch.Tensor:
    # Blobs of ink on a blank page: learnable, unlike uniform noise.
    cy, cx = torch.randint(6, 22, (n, 2), generator=torch.Generator().manual_seed(seed)).T.reshape(2, n, 1, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    return (torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0) * 255).to(torch.uint8)


def _learner(tmp_path, *, resume: bool = False, log=None, run_id: str = "", ranks: int = 1, **overrides) -> Learner:
    """A Learner on 320 synthetic images (10 steps per epoch), restored if ``resume``; ``log``
    receives the checkpointer's lines. ``ranks``: train as that many processes would, on one
    (a global batch of ranks x 32: 10 / ranks steps per epoch)."""
    cfg = TrainingConfig.from_dict(
        {
            "model": {"kind": "mlp", "hidden_sizes": [32], "latent_size": 4},
            # Constant: a run of more epochs then takes the same steps first.
            "optimizer": {"learning_rate": 3e-3, "schedule": "constant"},
            "data": {"batch_size": 32, "eval_batch_size": 100},
            "artifact_dir": str(tmp_path),
            "cpu": True,
            **overrides,
        }
    )
    acc = Accelerator(cpu=True)
    set_seed(cfg.seed)
    model = build(cfg)
    train = loaders.make_loader(loaders.MnistImages(_images(NUM_IMAGES, 0)), 32 * ranks, shuffle_seed=cfg.seed, drop_last=True,
                             num_workers=0)
    valid = loaders.make_loader(loaders.MnistImages(_images(100, 1)), 100, shuffle_seed=None, drop_last=False, num_workers=0)
    learner = Learner(
        acc, model, make_optimizer(model, cfg.optimizer), cfg, train, valid,
        artifact_dir=tmp_path, tracker=Tracker(acc),
        checkpointer=Checkpointer(acc, tmp_path / folder.CHECKPOINTS, 2, log or (lambda _: None), every_steps=cfg.checkpoint_every_steps, run_id=CHECKPOINT_RUN_ID),
        run_id=run_id,
    )
    if resume:
        learner.restore()
    return learner


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "second" not in k} for r in history]


def test_fit_trains_logs_and_checkpoints(tmp_path):
    learner = _learner(tmp_path, epochs=2, checkpoint_every_steps=4)
    learner.fit()
    history = learner.position.history
    assert [r["epoch"] for r in history] == [1, 2]
    assert learner.position.global_step == 2 * (NUM_IMAGES // 32)
    assert history[-1]["valid/loss"] < history[0]["valid/loss"] - 5  # it learns
    assert all(r["train/samples"] == NUM_IMAGES for r in history)
    assert [json.loads(l)["epoch"] for l in (tmp_path / folder.METRICS).read_text().splitlines()] == [1, 2]
    steps = sorted(f.manifest.global_step for f in learner.checkpointer.complete())
    assert steps == [16, 20]  # the newest two: every 4 steps mid-epoch, and the end of epoch 2


def test_max_steps_inside_an_epoch_is_a_complete_run(tmp_path):
    learner = _learner(tmp_path, epochs=5, max_steps=13)
    learner.fit()
    (first, last) = learner.position.history
    assert (last["epoch"], last["step"], last["complete_epoch"], last["train/samples"]) == (2, 13, False, 3 * 32)
    assert last["valid/samples"] == 100
    assert [json.loads(l)["step"] for l in (tmp_path / folder.METRICS).read_text().splitlines()] == [10, 13]
    newest = learner.checkpointer.complete()[0].manifest.state
    assert (newest.epoch, newest.batches_done, newest.global_step) == (1, 3, 13)


def test_progress_is_given_the_runs_steps_and_validations_left(tmp_path):
    learner = _learner(tmp_path, epochs=4, max_steps=25)  # 10 steps per epoch: the run ends in epoch 3
    progress = learner._progress()
    assert (progress.run_steps, progress.fixed_seconds) == (25, 0.0)  # no validation timed yet
    pos = learner.position
    pos.epoch, pos.batches_done, pos.global_step, pos.history = 1, 3, 13, [{"valid_seconds": 2.0}]
    progress = learner._progress()
    assert (progress.desc, progress.run_steps, progress.fixed_seconds) == ("epoch 2/4", 12, 2 * 2.0)


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DIST_TEST_NAN_AT", "7")
    learner = _learner(tmp_path, epochs=1, checkpoint_every_steps=5)
    with pytest.raises(TrainingError, match=r"^loss became non-finite at step 7; the last good checkpoint .*step-000000005 is kept$"):
        learner.fit()
    assert [p.name for p in (tmp_path / folder.CHECKPOINTS).iterdir()] == ["step-000000005"]  # nothing NaN written


def test_weights_turned_nan_by_a_last_step_are_never_saved_validated_or_called_good(tmp_path):
    # The epoch's last (10th) step makes a weight NaN; every loss it computed was finite.
    learner = _learner(tmp_path, epochs=1, checkpoint_every_steps=5)
    step = learner.step_optimizer.step

    def diverging_step():
        step()
        if learner.position.global_step == 9:  # counted after the step
            with torch.no_grad():
                next(learner.model.parameters()).view(-1)[0] = float("nan")

    learner.step_optimizer.step = diverging_step
    with pytest.raises(TrainingError, match=r"^weights became non-finite at step 10; the last good checkpoint "
                                            r".*step-000000005 is kept$"):
        learner.fit()
    assert [p.name for p in (tmp_path / folder.CHECKPOINTS).iterdir()] == ["step-000000005"]
    assert not (tmp_path / folder.METRICS).exists()  # nothing validated or drawn from them
