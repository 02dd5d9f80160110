"""Scoring a model: the test loss (``validate``, the same function at the end of every
training epoch and in ``evaluate``) and the importance-weighted NLL.

``evaluate`` loads only ``model.safetensors`` (weights and config, no pickle) and runs on the CPU.
Under ``accelerate launch`` the test split is sharded across the processes; every random
number is keyed by the test image's index, so the result does not depend on the process
count. Every result carries its protocol (data, binarization, K, test images, the
training KL weight), so no number is quoted without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from vae_dist.data import keyed
from vae_dist.data import loaders
from vae_dist.data import datasets
from vae_dist.config import TrainingConfig
from vae_dist.errors import VaeDistError, first_line
from vae_dist.models.protocol import Model
from vae_dist.data.keyed import EVAL_NOISE, generator, noise
from vae_dist.training.progress import Progress

if TYPE_CHECKING:  # accelerate is imported where it is used: the CLI's errors come before it
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader

IW_BATCH = 25  # test images per pass
IW_SEED = 0  # the estimate's noise is the same in every evaluation of every model
IW_NOISE = "iw-noise"


def test_images(
    config: TrainingConfig, data_dir: Optional[str | Path] = None, limit: Optional[int] = None
) -> torch.Tensor:
    """The test images (uint8) that training validates on and that evaluate and the picture
    commands use: the first ``limit`` (None: the config's limit; 0: all), binarized by the
    one fixed draw unless the run is grey-level."""
    folder, dataset = data_dir or config.data.data_dir, config.data.dataset
    root = Path(folder).expanduser() if folder else datasets.download(config.data.cache_dir, dataset)
    images = datasets.load_split(root, "test", dataset).images
    if config.data.binarize != "none":
        images = keyed.binarize_split(images, keyed.TEST_SEED, keyed.TEST_STREAM)
    n = limit if limit is not None else config.data.limit_eval_samples
    return images[:n] if n else images


@torch.no_grad()
def validate(accelerator: Accelerator, model: nn.Module, loader: DataLoader, noise: Optional[torch.Tensor]) -> dict[str, Any]:
    """The family's terms as exact sample-weighted means over the whole test split, at any
    process count, and its whole-set metrics (summarise). The terms are taken with KL
    weight 1 whatever the training objective's: the test loss is the true negative ELBO.

    ``gather_for_metrics`` per batch drops the samples Accelerate repeats to even out
    the last round, so every test sample is counted exactly once; each sample's noise is
    ``noise[index]``, the same whichever rank holds it.
    """
    family = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    for images_batch, index in loader:
        out = model(images_batch, None if noise is None else noise[index])
        terms, f = accelerator.gather_for_metrics((torch.stack(list(out.terms.values()), dim=1), out.features))
        rows.append(terms)
        features.append(f)
    model.train(was_training)
    per_sample = torch.cat(rows).double()  # (N, terms): summed in float64 so the order of ranks does not matter
    means = dict(zip(family.TERMS, per_sample.mean(dim=0).tolist()))
    return {**{f"valid/{name}": value for name, value in {**means, **family.summarise(torch.cat(features))}.items()},
            "valid/samples": int(per_sample.shape[0])}


def protocol(config: TrainingConfig, test_images: int, iw_samples: int = 0) -> dict[str, Any]:
    """What the numbers were measured on, and the KL weight the model was trained with (its
    test loss is the true negative ELBO whatever that weight)."""
    name, mode, tests = config.data.dataset, config.data.binarize, datasets.DATASETS[config.data.dataset].test
    out: dict[str, Any] = {"dataset": name, "data": f"grey-level {name} (pixel/255) with a Bernoulli likelihood"}
    if mode != "none":
        out["data"] = f"binarized {name}, training binarization {mode}"
        out["test_binarization"] = f"one fixed Bernoulli draw of the {tests:,} test images (seed {keyed.TEST_SEED})"
    out.update(likelihood=config.loss.recon_loss, train_kl_weight=config.loss.kl_weight, test_images=test_images)
    if iw_samples:
        out["iw_samples"] = iw_samples
    return out


def score(model: Model, config: TrainingConfig, images: torch.Tensor, *, iw_samples: int = 0) -> dict[str, Any]:
    """The test loss and the family's other terms exactly as training validates (the same
    function, the same per-sample noise) and, with ``iw_samples`` = K, the importance-weighted
    NLL. Every process returns the same dict."""
    from accelerate import Accelerator

    if iw_samples and model.iw_nll is None:
        raise VaeDistError(f"--model {config.model.kind} has no importance-weighted log-likelihood; drop --iw-samples")
    try:
        acc = Accelerator(cpu=True)
    except (ValueError, RuntimeError) as e:  # e.g. an ACCELERATE_* variable it cannot read
        raise VaeDistError(f"cannot set up the accelerator: {first_line(e)}") from None
    try:
        loader = loaders.make_loader(
            loaders.MnistImages(images), config.data.eval_batch_size, shuffle_seed=None, drop_last=False, num_workers=0
        )
        model = model.to(acc.device)  # no DDP wrapper: evaluation has no gradients to sync
        table = noise(EVAL_NOISE, config.seed, 0, images.shape[0], model.noise_shape(1))
        v = validate(acc, model, acc.prepare_data_loader(loader), None if table is None else table.to(acc.device))
        result: dict[str, Any] = {k.removeprefix("valid/"): value for k, value in v.items()}
        result["processes"] = acc.num_processes
        if iw_samples:
            mine = torch.arange(acc.process_index, images.shape[0], acc.num_processes)  # this rank's shard
            nll = iw_nll_per_image(model, images.float().div(255.0), mine, iw_samples, show=acc.is_main_process)
            rows = torch.stack([mine.double(), nll], dim=1)  # (index, NLL)
            if acc.num_processes > 1:  # shards differ by one row at most: pad (index -1) to gather
                rows = acc.gather(acc.pad_across_processes(rows, dim=0, pad_index=-1))
                rows = rows[rows[:, 0] >= 0]
            ordered = rows[rows[:, 0].argsort()]  # summed in index order: the same at any process count
            result["iw_nll"] = ordered[:, 1].sum().item() / images.shape[0]
            result["iw_samples"] = iw_samples
        result["protocol"] = protocol(config, images.shape[0], iw_samples)
    finally:
        acc.end_training()
    return result


@torch.no_grad()
def iw_nll_per_image(
    model: Model, images: torch.Tensor, indices: torch.Tensor, k: int, *, show: bool = False
) -> torch.Tensor:
    """The family's importance-weighted -log p(x) (nats, float64) of ``images[indices]``, floats
    in [0, 1] shaped (N, 1, 28, 28). Image i's K draws come from its own generator, keyed by
    its index, so its estimate does not depend on the batch or the rank it is computed in."""
    assert model.iw_nll is not None
    was_training = model.training
    model.eval()
    out = torch.empty(len(indices), dtype=torch.float64)
    batches = range(0, len(indices), IW_BATCH)
    progress = Progress(f"importance-weighted NLL, K = {k}", len(batches), 0, enabled=show, line_every=10.0)
    try:
        for start in batches:
            idx = indices[start : start + IW_BATCH]
            out[start : start + len(idx)] = model.iw_nll(images[idx], k, [generator(IW_NOISE, IW_SEED, int(i)) for i in idx])
            progress.step()
    finally:
        progress.close()
        model.train(was_training)
    return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_result(result: dict[str, Any]) -> str:
    """The result as one line of strict JSON: a non-finite number (a diverged model's NaN
    loss) becomes null, since NaN and Infinity are not JSON and strict parsers refuse them."""
    return json.dumps(_finite_or_none(result), allow_nan=False)
