"""Scoring (vae_dist.evaluation.evaluate): the one choice of test images that training validates on and
evaluate and the picture commands use, and a result that strict JSON parsers accept.
(evaluate's numbers, at 1 and 3 processes against training's validation, are in
test_distributed.)"""

from __future__ import annotations

import json

import pytest
import torch

from vae_dist.evaluation import evaluate
from vae_dist.config import TrainingConfig
from vae_dist.models import build
from vae_dist.run.fileio import dumps


def _config(**data) -> TrainingConfig:
    return TrainingConfig.from_dict({"seed": data.pop("seed", 0), "data": {"data_dir": "mnist", **data}})


def test_the_test_images_are_one_fixed_draw_whatever_the_run(monkeypatch) -> None:
    split = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(evaluate.datasets, "load_split", lambda root, name, dataset: evaluate.datasets.Split(split))
    assert torch.equal(evaluate.test_split(_config(binarize="none")).images, split)
    static = evaluate.test_split(_config(binarize="static", seed=1)).images
    dynamic = evaluate.test_split(_config(binarize="dynamic", seed=99)).images
    assert torch.equal(static, dynamic) and set(static.unique().tolist()) == {0, 255}
    # None: the run's own limit (its validation slice); 0: all of them; N: the first N
    limited = _config(binarize="static", limit_eval_samples=30)
    assert torch.equal(evaluate.test_split(limited).images, static[:30])
    assert torch.equal(evaluate.test_split(limited, limit=20).images, static[:20])
    assert torch.equal(evaluate.test_split(limited, limit=0).images, static)


def test_a_result_is_strict_json() -> None:  # as evaluate --json prints it
    text = dumps({"loss": float("nan"), "iw_nll": float("inf"), "kl": -float("inf"), "recon": 1.5,
                  "protocol": {"test_images": 3, "x": [float("nan")]}})

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == {"loss": None, "iw_nll": None, "kl": None, "recon": 1.5, "protocol": {"test_images": 3, "x": [None]}}
    assert "\n" not in text


def test_the_test_loss_is_the_true_negative_elbo_whatever_the_training_kl_weight() -> None:
    # A --kl-weight 0 model must not look better by leaving its KL out of its test loss.
    config = TrainingConfig.from_dict({"model": {"kind": "mlp"}, "loss": {"kl_weight": 0.0, "kl_warmup_epochs": 0}})
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    result = evaluate.score(build(config), config, images)
    assert result["kl"] > 0.1 and result["loss"] == pytest.approx(result["recon"] + result["kl"], rel=1e-6)
    assert result["protocol"]["train_kl_weight"] == 0.0


def test_the_protocol_names_the_dataset() -> None:
    grey = evaluate.protocol(_config(dataset="kmnist"), 100)
    assert grey["dataset"] == "kmnist" and grey["data"] == "grey-level kmnist (pixel/255) with a Bernoulli likelihood"
    binarized = evaluate.protocol(_config(dataset="fashion-mnist", binarize="dynamic"), 100, iw_samples=5)
    assert binarized["dataset"] == "fashion-mnist" and binarized["data"] == "binarized fashion-mnist, training binarization dynamic"
    assert binarized["test_binarization"] == "one fixed Bernoulli draw of the 10,000 test images (seed 0)"
    assert binarized["test_images"] == 100 and binarized["iw_samples"] == 5
