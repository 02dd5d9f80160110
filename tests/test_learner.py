"""Learner.fit in process on a few hundred synthetic images: the fast tier's check that
the loop trains, logs, checkpoints, stops at max_steps and resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_dist import artifacts, data
from vae_dist.checkpoint import Checkpointer
from vae_dist.config import TrainingConfig
from vae_dist.learner import Learner
from vae_dist.model import VAE
from vae_dist.tracking import Tracker
from vae_dist.train import make_optimizer

NUM_IMAGES = 320


def _images(n: int, seed: int) -> torch.Tensor:
    # Blobs of ink on a blank page: learnable, unlike uniform noise.
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    centres = torch.randint(6, 22, (n, 2), generator=g)
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    for i, (cy, cx) in enumerate(centres.tolist()):
        x[i, 0] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0)
    return (x * 255).to(torch.uint8)


def _learner(tmp_path, *, resume: bool = False, log=None, **overrides) -> Learner:
    """A Learner on 320 synthetic images (10 steps per epoch); ``log`` receives the checkpointer's lines."""
    cfg = TrainingConfig.from_dict(
        {
            "model": {"kind": "mlp", "hidden_sizes": [32], "latent_size": 4},
            "optimizer": {"learning_rate": 3e-3},
            "data": {"batch_size": 32, "eval_batch_size": 100},
            "artifact_dir": str(tmp_path),
            "cpu": True,
            **overrides,
        }
    )
    acc = Accelerator(cpu=True)
    set_seed(cfg.seed)
    model = VAE.from_config(cfg.model)
    train = data.make_loader(data.MnistImages(_images(NUM_IMAGES, 0)), 32, shuffle_seed=cfg.seed, drop_last=True, num_workers=0)
    valid = data.make_loader(data.MnistImages(_images(100, 1)), 100, shuffle_seed=None, drop_last=False, num_workers=0)
    return Learner(
        acc, model, make_optimizer(model, cfg.optimizer), cfg, train, valid,
        artifact_dir=tmp_path, tracker=Tracker(acc, "disabled"),
        checkpointer=Checkpointer(acc, tmp_path / artifacts.CHECKPOINTS, 2, log or (lambda _: None), every_steps=cfg.checkpoint_every_steps),
        resume=resume,
    )


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_trains_logs_and_checkpoints(tmp_path):
    learner = _learner(tmp_path, epochs=3, checkpoint_every_steps=4)
    learner.fit()
    history = learner.position.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert learner.position.global_step == 3 * (NUM_IMAGES // 32)
    assert history[-1]["valid/loss"] < history[0]["valid/loss"] - 5  # it learns
    assert all(r["train/samples"] == NUM_IMAGES for r in history)
    assert [json.loads(l)["epoch"] for l in (tmp_path / artifacts.METRICS).read_text().splitlines()] == [1, 2, 3]
    steps = sorted(f.global_step for f in learner.checkpointer.complete())
    assert steps == [28, 30]  # the newest two: every 4 steps mid-epoch, and the end of epoch 3


def test_max_steps_stops_mid_epoch_and_still_validates(tmp_path):
    learner = _learner(tmp_path, epochs=5, max_steps=13)
    learner.fit()
    assert learner.position.global_step == 13
    last = learner.position.history[-1]
    assert last["epoch"] == 2 and last["complete_epoch"] is False and last["train/samples"] == 3 * 32


LITERATURE = {
    "data": {"batch_size": 32, "eval_batch_size": 100, "binarize": "dynamic"},
    "loss": {"iw_samples": 3},
    "optimizer": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_epochs": 0.5},
}


@pytest.mark.parametrize(
    "first_steps, recipe",
    [(10, {}), (14, {}), (14, LITERATURE)],
    ids=["epoch-end", "mid-epoch", "mid-epoch-binarized-iw-cosine"],
)
def test_resume_reaches_the_uninterrupted_weights(tmp_path, first_steps, recipe):
    whole = _learner(tmp_path / "whole", epochs=2, **recipe)
    whole.fit()
    _learner(tmp_path / "split", epochs=2, max_steps=first_steps, **recipe).fit()
    resumed = _learner(tmp_path / "split", epochs=2, resume=True, **recipe)
    resumed.fit()
    assert torch.equal(_weights(resumed.model), _weights(whole.model))
    assert _untimed(resumed.position.history) == _untimed(whole.position.history)


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "second" not in k} for r in history]


def test_nonfinite_loss_names_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DIST_TEST_NAN_AT", "7")
    learner = _learner(tmp_path, epochs=1, log_every_steps=5)
    with pytest.raises(Exception, match="non-finite at step 7"):
        learner.fit()
