"""Scoring a saved model: the test loss as training logged it, and the importance-weighted NLL.

Loads only ``model.safetensors`` (weights and config, no pickle) and runs on one process,
on the CPU unless told otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from vae_dist import binarize, data
from vae_dist.config import TrainingConfig
from vae_dist.loss import gaussian_log_prob, reconstruction
from vae_dist.model import VAE
from vae_dist.noise import eval_noise

# Decoded images held at once by the IW estimate (K x batch); bounds memory for K=5000.
IW_CHUNK_IMAGES = 16384


def test_images(config: TrainingConfig, data_dir: Optional[str], limit: Optional[int]) -> torch.Tensor:
    folder = data_dir or config.data.data_dir
    root = Path(folder).expanduser() if folder else data.download(config.data.cache_dir)
    images = data.load_split(root, "test").images
    if config.data.binarize != "none":  # the same fixed draw training validated on
        images = binarize.binarize_split(images, binarize.TEST_SEED, binarize.TEST_STREAM)
    n = limit if limit is not None else config.data.limit_eval_samples
    return images[:n] if n else images


def elbo_terms(
    model: VAE, config: TrainingConfig, images: torch.Tensor, *, cpu: bool = True
) -> dict[str, float]:
    """The validation numbers exactly as training computes them: the same function, the
    same per-sample noise (keyed by index), the same KL weight. Under `accelerate launch`
    the test split is sharded across the processes and gathered back, so the result is
    the same at any process count."""
    from accelerate import Accelerator

    from vae_dist.data import MnistImages, make_loader
    from vae_dist.learner import validate

    acc = Accelerator(cpu=cpu)
    try:
        loader = make_loader(
            MnistImages(images), config.data.eval_batch_size, shuffle_seed=None, drop_last=False, num_workers=0
        )
        loader = acc.prepare_data_loader(loader)
        model = model.to(acc.device)  # no DDP wrapper: evaluation has no gradients to sync
        noise = eval_noise(config.seed, images.shape[0], model.latent_size).to(acc.device)
        v = validate(acc, model, loader, noise, config.loss)
    finally:
        acc.end_training()
    return {
        "loss": v["valid/loss"],
        "recon": v["valid/recon"],
        "kl": v["valid/kl"],
        "samples": v["valid/samples"],
        "active_units": v["valid/active_units"],
        "processes": acc.num_processes,
    }


@torch.no_grad()
def iw_nll(model: VAE, config: TrainingConfig, images: torch.Tensor, k: int, seed: int = 0, batch_size: int = 100) -> float:
    """Importance-weighted estimate of -log p(x) in nats per image (Burda et al. 2016):
    log p(x) ~ logsumexp_k[log p(x, z_k) - log q(z_k | x)] - log K, z_k ~ q(z | x).

    log p(x | z) is minus the training reconstruction term, so for ``mse`` the estimate
    drops the same constant the loss drops and the two stay comparable. The K samples are
    taken in chunks with a running logsumexp, so K = 5000 fits in memory.
    """
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float().div(255.0)  # (B, 1, 28, 28)
        b = x.shape[0]
        mu, logvar = model.encode(x)  # (B, L)
        std = torch.exp(0.5 * logvar)
        chunk = max(1, IW_CHUNK_IMAGES // b)
        running = torch.full((b,), -math.inf, dtype=torch.float64)
        for k0 in range(0, k, chunk):
            kk = min(chunk, k - k0)
            eps = torch.randn(kk, b, mu.shape[1], generator=g)
            z = mu + eps * std  # (kk, B, L)
            logits = model.decode(z.reshape(kk * b, -1))
            log_px_z = -reconstruction(logits, x.repeat(kk, 1, 1, 1), config.loss.recon_loss).view(kk, b)
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            log_qz = gaussian_log_prob(z, mu, logvar)
            w = (log_px_z + log_pz - log_qz).double()  # (kk, B)
            running = torch.logaddexp(running, torch.logsumexp(w, dim=0))
        total += -(running - math.log(k)).sum().item()
    return total / images.shape[0]


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
