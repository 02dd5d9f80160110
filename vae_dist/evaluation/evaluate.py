"""Scoring a model: the test ELBO (``validate``, the same function at the end of every
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
from vae_dist.config import LossConfig, TrainingConfig
from vae_dist.errors import VaeDistError, first_line
from vae_dist.models.gaussian import log_importance_weights, negative_elbo, reconstruction
from vae_dist.models.gaussian import VAE
from vae_dist.data.keyed import eval_noise, generator
from vae_dist.training.progress import Progress

if TYPE_CHECKING:  # accelerate is imported where it is used: the CLI's errors come before it
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader

IW_BATCH = 25  # test images per pass
IW_CHUNK = 400  # importance samples per image per pass: bounds memory whatever K is
IW_SEED = 0  # the estimate's noise is the same in every evaluation of every model
IW_NOISE = "iw-noise"
# A unit is "active" when its posterior mean varies over the data (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01


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
def validate(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, noise: torch.Tensor, loss: LossConfig
) -> dict[str, float]:
    """Exact sample-weighted means over the whole test split, at any process count.

    ``gather_for_metrics`` per batch drops the samples Accelerate repeats to even out
    the last round, so every test sample is counted exactly once; each sample's noise is
    ``noise[index]``, the same whichever rank holds it.
    """
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    mus: list[torch.Tensor] = []
    for images_batch, index in loader:
        out = model(images_batch, noise[index])
        # KL weight 1 whatever the training objective's: the test loss is the true negative
        # ELBO, a bound on -log p(x) that models trained with different weights share.
        p = negative_elbo(out.logits, out.mu, out.logvar, images_batch, kind=loss.recon_loss, kl_weight=1.0)
        per_sample, mu = accelerator.gather_for_metrics((torch.stack([p.total, p.recon, p.kl], dim=1), out.mu.float()))
        rows.append(per_sample)
        mus.append(mu)
    model.train(was_training)
    per_sample = torch.cat(rows).double()  # (N, 3): summed in float64 so the order of ranks does not matter
    mu = torch.cat(mus)
    means = per_sample.mean(dim=0).tolist()
    active = int((mu.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum().item()) if mu.shape[0] > 1 else 0
    return {
        "valid/loss": means[0],
        "valid/recon": means[1],
        "valid/kl": means[2],
        "valid/active_units": active,
        "valid/samples": int(per_sample.shape[0]),
    }


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


def score(model: VAE, config: TrainingConfig, images: torch.Tensor, *, iw_samples: int = 0) -> dict[str, Any]:
    """The test loss (the negative ELBO), reconstruction and KL exactly as training
    validates (the same function, the same per-sample noise) and, with ``iw_samples`` = K,
    the importance-weighted NLL. Every process returns the same dict."""
    from accelerate import Accelerator

    try:
        acc = Accelerator(cpu=True)
    except (ValueError, RuntimeError) as e:  # e.g. an ACCELERATE_* variable it cannot read
        raise VaeDistError(f"cannot set up the accelerator: {first_line(e)}") from None
    try:
        loader = loaders.make_loader(
            loaders.MnistImages(images), config.data.eval_batch_size, shuffle_seed=None, drop_last=False, num_workers=0
        )
        model = model.to(acc.device)  # no DDP wrapper: evaluation has no gradients to sync
        noise = eval_noise(config.seed, images.shape[0], model.latent_size).to(acc.device)
        v = validate(acc, model, acc.prepare_data_loader(loader), noise, config.loss)
        result: dict[str, Any] = {
            "loss": v["valid/loss"], "recon": v["valid/recon"], "kl": v["valid/kl"],
            "samples": v["valid/samples"], "active_units": v["valid/active_units"], "processes": acc.num_processes,
        }
        if iw_samples:
            mine = torch.arange(acc.process_index, images.shape[0], acc.num_processes)  # this rank's shard
            nll = iw_nll_per_image(model, config, images.float().div(255.0), mine, iw_samples, show=acc.is_main_process)
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
    model: VAE, config: TrainingConfig, images: torch.Tensor, indices: torch.Tensor, k: int, *, show: bool = False
) -> torch.Tensor:
    """Importance-weighted estimates of -log p(x) (nats) for ``images[indices]``, floats in
    [0, 1] shaped (N, 1, 28, 28) (Burda et al. 2015): log p(x) ~ logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] - log K,
    z_k ~ q(z | x), float64 (len(indices),).

    Each image's K draws come from its own generator, in chunks of IW_CHUNK, so an image's
    estimate does not depend on the batch or the rank it is computed in. log p(x | z) is
    minus the training reconstruction term (for ``mse`` without the same constant).
    """
    was_training = model.training
    model.eval()
    out = torch.empty(len(indices), dtype=torch.float64)
    batches = range(0, len(indices), IW_BATCH)
    progress = Progress(f"importance-weighted NLL, K = {k}", len(batches), 0, enabled=show, line_every=10.0)
    try:
        for start in batches:
            idx = indices[start : start + IW_BATCH]
            x = images[idx]  # (B, 1, 28, 28)
            b = x.shape[0]
            mu, logvar = model.encode(x)  # (B, L)
            generators = [generator(IW_NOISE, IW_SEED, int(i)) for i in idx]
            running = torch.full((b,), -math.inf, dtype=torch.float64)
            for k0 in range(0, k, IW_CHUNK):
                kk = min(IW_CHUNK, k - k0)
                eps = torch.stack([torch.randn(kk, mu.shape[1], generator=g) for g in generators], dim=1)  # (kk, B, L)
                z = mu + eps * torch.exp(0.5 * logvar)
                logits = model.decode(z.reshape(kk * b, -1))
                log_px_z = -reconstruction(logits, x.repeat(kk, 1, 1, 1), config.loss.recon_loss).view(kk, b)
                log_w = log_importance_weights(log_px_z, z, mu, logvar)  # (kk, B)
                running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
            out[start : start + b] = -(running - math.log(k))
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
