"""The Python API (``load``, ``TrainedVAE``, ``iw_nll``, ``train``): a trained model and what it does, for
notebooks, scripts and the picture commands; bad input raises the one-line errors of vae_dist.errors."""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any, Optional

import torch

from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError, DataError, VaeDistError, first_line
from vae_dist.evaluation.evaluate import evaluating, iw_nll_per_image, prior_samples, reconstructions
from vae_dist.models.protocol import MAX_GENERATOR_SEED, MAX_IMAGES, MAX_IW_SAMPLES, Model
from vae_dist.run.checkpoint import MANIFEST, read_manifest, verify_hashes
from vae_dist.run.fileio import checking
from vae_dist.run.folder import MODEL
from vae_dist.run.modelfile import load_model_file, model_results


INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """N >= 1 images of the model's ``shape`` (C, H, W), uint8 or floats in [0, 1], shaped (N, C*H*W), (N, C, H, W)
    or for grey images (N, H, W), as floats (N, C, H, W): every image the API takes comes through here."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"images must be a torch.Tensor, got {type(x).__name__}")
    c, h, w = shape
    accepted = [(c * h * w,), *([(h, w)] if c == 1 else []), (c, h, w)]
    if tuple(x.shape[1:]) not in accepted or not len(x):
        shown = " or ".join(f"(N, {', '.join(map(str, s))})" for s in accepted)
        raise DataError(f"images must be at least one, shaped {shown}, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.reshape(-1, c, h, w).float().div(255.0)
    if not x.is_floating_point():
        raise DataError(f"images must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}")
    if not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise DataError("floating-point images must be finite and lie in [0, 1] (divide uint8 pixels by 255)")
    return x.reshape(-1, c, h, w).float()


def as_count(name: str, value: Any, low: int, high: int) -> int:
    """``value``, an integer from ``low`` to ``high``: every count the API takes comes through here, bounded so that
    what it makes fits in memory (and time)."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)  # an int, numpy's too; never 2.0 or True
    except TypeError:
        n = None
    if n is None or not low <= n <= high:
        raise DataError(f"{name} must be an integer from {low:,} to {high:,}, got {value!r:.40}")
    return n


def manifold_grid(n_per_side: int) -> torch.Tensor:
    """The (n*n, 2) latent points of the manifold picture, row-major: rows from high to low z2, columns
    from low to high z1, at the standard normal quantiles of an even grid in (0, 1) (Kingma & Welling 2014)."""
    u = torch.linspace(0.05, 0.95, n_per_side) if n_per_side > 1 else torch.tensor([0.5])
    q = torch.distributions.Normal(0.0, 1.0).icdf(u)
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


class TrainedVAE:
    """A trained VAE (``model``, the torch module) with its config and results; its pictures are mean
    images, float (N, C, H, W) in [0, 1] on the CPU (the config's model.image_shape)."""

    def __init__(self, model: Model, config: TrainingConfig, results: dict[str, Any]):
        self.model, self.config, self.results = model.eval(), config, results
        self.latent_size: Optional[int] = model.latent_size  # of the continuous latent space (vq-vae: None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _needs(self, ability: str, what: str) -> None:
        if getattr(self.model, ability) is None:
            raise VaeDistError(f"--model {self.config.model.kind} has no {what}")

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return as_images(x, self.config.model.image_shape)

    def _labels(self, labels: Any, n: int) -> Optional[torch.Tensor]:
        """A conditional model's labels as (n,) classes, from one class for all or one per image; None for another."""
        classes = self.model.num_classes
        if not classes:
            if labels is not None:
                raise DataError("this model is not conditional: it takes no labels (train one with --conditional)")
            return None
        try:
            t = torch.as_tensor([] if labels is None else labels)
        except (TypeError, ValueError, RuntimeError):  # not numbers
            t = torch.empty(0)
        if labels is None or t.dtype not in INTEGERS or t.shape not in ((), (n,)) or ((t < 0) | (t >= classes)).any():
            got = labels if labels is None or t.dim() == 0 else f"{t.dtype} {list(t.shape)}"
            raise DataError(f"this model is conditional: its labels are one class for all, or one per image ({n}), "
                            f"each 0 to {classes - 1}; got {got}")
        return t.long().expand(n)

    def to(self, device: str | torch.device) -> TrainedVAE:
        try:
            if torch.device(device).type == "meta":
                raise ValueError("the meta device holds no weights")
            self.model.to(device)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # unknown, absent, or not built in
            raise VaeDistError(f"cannot move the model to {device!r:.40}: {first_line(e)}") from None
        return self

    def encode(self, images: torch.Tensor, labels: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior q(z | x): its means and log-variances, each (N, latent), on the CPU. ``labels``: a
        conditional model's classes of the images (one for all, or one each)."""
        self._needs("encode", "continuous latent space to encode into")
        x = self._images(images)
        y = self._labels(labels, x.shape[0])
        with evaluating(self.model):
            mu, logvar = self.model.encode(x.to(self.device), y)
        return mu.cpu(), logvar.cpu()

    def decode(self, z: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """Mean images of latents z (N, latent), finite floats of any precision (of class ``labels``, for a
        conditional model)."""
        self._needs("decode", "continuous latent space to decode")
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_size or not len(z):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise DataError(f"latents must be at least one, shaped (N, {self.latent_size}), got {shape}")
        if not z.is_floating_point():
            raise DataError(f"latents must be floating point, got {z.dtype}")
        if not torch.isfinite(z).all():
            raise DataError("latents must be finite (a NaN or an infinity decodes to no image)")
        y = self._labels(labels, z.shape[0])
        weight = next(self.model.parameters())
        with evaluating(self.model):  # in the model's own precision: float64 latents meet float32 weights
            return torch.sigmoid(self.model.decode(z.to(weight.device, weight.dtype), y).float()).cpu()

    def sample(self, n: int, seed: int = 0, label: Optional[int] = None) -> torch.Tensor:
        """n images from the model's prior; the same seed gives the same images. A conditional model's are of class
        ``label``, or without one of each class in turn, ceil(n / classes) each (a grid that wide: a row per class)."""
        n, seed = as_count("n", n, 1, MAX_IMAGES), as_count("seed", seed, 0, MAX_GENERATOR_SEED)
        if label is not None:
            self._labels(label, n)
        return prior_samples(self.model, n, seed, label)

    def reconstruct(self, images: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """Each image decoded from its posterior mean (given its class ``labels``, for a conditional model)."""
        x = self._images(images)
        return reconstructions(self.model, x, self._labels(labels, x.shape[0]))

    def interpolate(self, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10,
                    label: Optional[int] = None) -> torch.Tensor:
        """``steps`` decodings along the straight latent line between two images' posterior means, ends included
        (a conditional model's all within class ``label``)."""
        steps = as_count("steps", steps, 2, MAX_IMAGES)
        a, b = self._images(x_from), self._images(x_to)
        if a.shape[0] != 1 or b.shape[0] != 1:
            raise DataError("interpolate takes one image at each end")
        ends = self.encode(torch.cat([a, b]), label)[0]
        t = torch.linspace(0.0, 1.0, steps, dtype=ends.dtype).unsqueeze(1)
        return self.decode((1 - t) * ends[0] + t * ends[1], label)

    def manifold(self, n_per_side: int, label: Optional[int] = None) -> torch.Tensor:
        """Decodings over an n x n grid of a 2-D latent space (see ``manifold_grid``; a conditional model's of
        class ``label``)."""
        self._needs("decode", "continuous latent space to draw a manifold of")
        if self.latent_size != 2:
            raise VaeDistError(f"a manifold picture needs a model with a 2-dimensional latent space; this one has "
                               f"{self.latent_size} (train one with --latent-size 2)")
        return self.decode(manifold_grid(as_count("n_per_side", n_per_side, 1, math.isqrt(MAX_IMAGES))), label)


def load(path: str | Path, device: str | torch.device = "cpu") -> TrainedVAE:
    """The model a run folder, its model.safetensors or a checkpoint folder holds, on ``device``."""
    try:
        p = Path(path).expanduser()
    except (TypeError, RuntimeError) as e:  # not a path; a ~user unknown here
        raise ArtifactError(f"model path {path!r:.200} cannot be used: {first_line(e)}") from None
    with checking(p, ArtifactError, "model path"):
        is_checkpoint = p.is_dir() and (p / MANIFEST).is_file()
    if not is_checkpoint:
        return TrainedVAE(*load_model_file(p), model_results(p)).to(device)
    manifest = read_manifest(p)
    problem = verify_hashes(p, manifest) if manifest is not None else "its manifest or one of its files does not verify"
    if problem or manifest is None:
        raise ArtifactError(f"checkpoint {p} is unusable: {problem}")
    model, config = load_model_file(p / MODEL, config=manifest.state.config)
    return TrainedVAE(model, config, manifest.state.results()).to(device)


def iw_nll(model: TrainedVAE, images: torch.Tensor, k: int = 5000, labels: Any = None) -> float:
    """-log p(x) in nats per image (a conditional model's -log p(x | label)), averaged over ``images``, by
    ``evaluate --iw-samples k``'s estimator."""
    if not isinstance(model, TrainedVAE):
        raise VaeDistError(f"iw_nll takes the model vae_dist.load returns, got {type(model).__name__}")
    model._needs("iw_nll", "importance-weighted log-likelihood")
    k, x = as_count("k", k, 1, MAX_IW_SAMPLES), model._images(images).cpu()
    y = model._labels(labels, x.shape[0])
    device = model.device  # the estimator's draws come from CPU generators: it runs there
    try:
        nll = iw_nll_per_image(model.model.cpu(), x, torch.arange(x.shape[0]), k, labels=y)
    finally:
        model.model.to(device)
    return nll.mean().item()


def train(config: TrainingConfig, *, resume: bool = False, overwrite: bool = False) -> TrainedVAE:
    """Train as ``vae-dist train`` does with this config; returns the trained model. The process's settings
    (subnormals flushed) are the caller's again when it returns or raises."""
    from vae_dist.training import runtime
    from vae_dist.training.trainer import train as run_training
    with runtime.borrowed_process(config.flush_denormal):
        path = run_training(config, resume=resume, overwrite=overwrite)
    return load(path)
