"""A trained model on the test images: validation (each epoch's end and ``evaluate``), the importance-weighted NLL
and the previews' pictures. Random numbers are keyed by the image's index (any process count gives one result)."""

from __future__ import annotations

from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from vae_dist.config import TrainingConfig
from vae_dist.data import datasets, keyed, loaders
from vae_dist.errors import DataError, VaeDistError, first_line
from vae_dist.models.protocol import Model
from vae_dist.training.tracking import Progress

if TYPE_CHECKING:  # accelerate is imported where it is used: the CLI's errors come before it
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader

# Test images per pass; the estimate's noise (seed, stream) is the same in every evaluation of every model.
IW_BATCH, IW_SEED, IW_NOISE = 25, 0, "iw-noise"


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """no_grad and eval mode for the block, then the model's previous mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def prior_samples(model: Model, n: int, seed: int, label: Optional[int] = None) -> torch.Tensor:
    """``n`` mean images (n, C, H, W) from the prior, drawn by a generator seeded with ``seed``. A conditional model's
    are all of class ``label``, or without one of each class in turn, ``class_row(model, n)`` each: in a grid that
    wide, one row per class. The same latents whatever the labels."""
    labels = None
    if model.num_classes:
        labels = torch.full((n,), label) if label is not None else torch.arange(n) // class_row(model, n)
    with evaluating(model):
        return model.sample(n, torch.Generator().manual_seed(seed), labels)


def class_row(model: Model, n: int) -> int:
    """How many of ``n`` samples a conditional model draws of each class when given none."""
    return -(-n // model.num_classes)  # type: ignore[operator]


def reconstructions(model: Model, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each of the (N, C, H, W) images in [0, 1] reconstructed without sampling noise, on the CPU."""
    with evaluating(model):
        return model.reconstruct(images, labels)


def test_split(config: TrainingConfig, data_dir: Optional[str | Path] = None,
               limit: Optional[int] = None) -> datasets.Split:
    """The test images (uint8) of validation, evaluate and the pictures: the first ``limit`` (None: the config's;
    0: all), binarized by the one fixed draw unless grey-level; refused unless of the model's image shape. With their
    labels for a conditional model (refused if it does not know their classes), else labels None."""
    folder, dataset, model = data_dir or config.data.data_dir, config.data.dataset, config.model
    root = Path(folder).expanduser() if folder else datasets.download(config.data.cache_dir, dataset)
    images, labels, classes = datasets.load_split(root, "test", dataset)
    if (shape := tuple(images.shape[1:])) != tuple(model.image_shape):
        raise DataError(f"the {dataset} test images in {root} are {'x'.join(map(str, shape))}; the model takes "
                        f"{'x'.join(map(str, model.image_shape))}")
    if model.conditional and (labels is None or int(labels.max()) >= model.num_classes):  # type: ignore[operator]
        held = "no labels" if labels is None else f"label {int(labels.max())}"
        raise DataError(f"the {dataset} test images in {root} have {held}; the conditional model takes classes 0 to "
                        f"{model.num_classes - 1}")  # type: ignore[operator]
    if config.data.binarize != "none":
        images = keyed.binarize_split(images, keyed.TEST_SEED, keyed.TEST_STREAM)
    first = slice((limit if limit is not None else config.data.limit_eval_samples) or None)  # 0 and None: all
    return datasets.Split(images[first], labels[first] if model.conditional else None, classes)


def valid_noise(model: Model, seed: int, n: int) -> Optional[torch.Tensor]:
    """Validation's per-image noise on the CPU: one table for every epoch and for ``evaluate``, so they compare."""
    return keyed.noise(keyed.EVAL_NOISE, seed, 0, n, model.noise_shape(1))


def validate(acc: Accelerator, model: nn.Module, loader: DataLoader, noise: Optional[torch.Tensor],
             family: Model) -> dict[str, Any]:
    """The family's terms (KL weight 1: the true negative ELBO) as exact means over the test split, and its whole-set
    metrics. Each sample counts once (``gather_for_metrics`` drops repeats), with its noise ``noise[index]`` (and its
    label, for a conditional model). ``model`` as prepared (DDP, compiled), ``family`` the module it wraps: not
    ``acc.unwrap_model``, whose check for a compiled module imports torch._dynamo, a second or more per process."""
    labels = loader.dataset.labels  # type: ignore[attr-defined]
    rows, features = [], []
    with evaluating(model):
        for images_batch, index in loader:
            out = model(images_batch, None if noise is None else noise[index],
                        labels=None if labels is None else labels[index])
            terms, f = acc.gather_for_metrics((torch.stack(list(out.terms.values()), dim=1), out.features))
            rows.append(terms)
            features.append(f)
    per_sample = torch.cat(rows).double()  # (N, terms): summed in float64 so the order of ranks does not matter
    means = dict(zip(family.TERMS, per_sample.mean(dim=0).tolist()))
    return {**{f"valid/{name}": value for name, value in {**means, **family.summarise(torch.cat(features))}.items()},
            "valid/samples": int(per_sample.shape[0])}


def protocol(config: TrainingConfig, test_images: int, iw_samples: int = 0) -> dict[str, Any]:
    """What the numbers were measured on, and the KL weight the model was trained with."""
    name, mode, tests = config.data.dataset, config.data.binarize, datasets.DATASETS[config.data.dataset].test
    tests = f"{tests:,} test images" if tests else "test images"  # an npy dataset's count is its file's
    out: dict[str, Any] = {"dataset": name, "data": f"grey-level {name} (pixel/255) with a Bernoulli likelihood"}
    if mode != "none":
        out["data"] = f"binarized {name}, training binarization {mode}"
        out["test_binarization"] = f"one fixed Bernoulli draw of the {tests} (seed {keyed.TEST_SEED})"
    out.update(likelihood=config.loss.recon_loss, train_kl_weight=config.loss.kl_weight, test_images=test_images)
    if config.model.conditional:  # not comparable with an unconditional model's numbers
        out["conditional"] = "each image's class given: the loss bounds -log p(x | class)"
    if iw_samples:
        out["iw_samples"] = iw_samples
    return out


def score(model: Model, config: TrainingConfig, images: torch.Tensor, *, iw_samples: int = 0,
          labels: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """The test terms as training validates, and with ``iw_samples`` = K the importance-weighted NLL; the same dict
    on every process. ``labels``: the images' classes, for a conditional model."""
    # Before the process group exists (see training/trainer.py): imported later, it holds the group until the
    # interpreter's teardown, whose gloo threads can then abort a finished rank.
    import torch.distributed.nn  # noqa: F401
    from accelerate import Accelerator
    if iw_samples and model.iw_nll is None:
        raise VaeDistError(f"--model {config.model.kind} has no importance-weighted log-likelihood; drop --iw-samples")
    from vae_dist.training.distributed import join_processes
    try:
        join_processes(cpu=True)
        acc = Accelerator(cpu=True)
    except (ValueError, RuntimeError) as e:  # e.g. an ACCELERATE_* variable it cannot read
        raise VaeDistError(f"cannot set up the accelerator: {first_line(e)}") from None
    try:
        loader = loaders.make_loader(loaders.MnistImages(images, labels), config.data.eval_batch_size,
                                     shuffle_seed=None, drop_last=False, num_workers=0)
        model = model.to(acc.device)  # no DDP wrapper: evaluation has no gradients to sync
        table = valid_noise(model, config.seed, images.shape[0])
        v = validate(acc, model, acc.prepare_data_loader(loader), None if table is None else table.to(acc.device),
                     model)
        result = {**{k.removeprefix("valid/"): value for k, value in v.items()}, "processes": acc.num_processes}
        if iw_samples:
            mine = torch.arange(acc.process_index, images.shape[0], acc.num_processes)  # this rank's shard
            nll = torch.zeros(images.shape[0], dtype=torch.float64)  # each image's, exact after a sum with 0s
            nll[mine] = iw_nll_per_image(model, images.float().div(255.0), mine, iw_samples, labels=labels,
                                         show=acc.is_main_process)
            nll = acc.reduce(nll, reduction="sum")  # one process: a copy
            result.update(iw_nll=nll.sum().item() / images.shape[0], iw_samples=iw_samples)
        result["protocol"] = protocol(config, images.shape[0], iw_samples)
    finally:
        acc.end_training()
    return result


def iw_nll_per_image(model: Model, images: torch.Tensor, indices: torch.Tensor, k: int, *,
                     labels: Optional[torch.Tensor] = None, show: bool = False) -> torch.Tensor:
    """The importance-weighted -log p(x) (nats, float64) of ``images[indices]``, floats in [0, 1]; image i's K
    draws come from its own generator, keyed by its index: the same in any batch or rank."""
    assert model.iw_nll is not None
    out = torch.empty(len(indices), dtype=torch.float64)
    batches = range(0, len(indices), IW_BATCH)
    progress = Progress(f"importance-weighted NLL, K = {k}", len(batches), 0, enabled=show, line_every=10.0)
    with closing(progress), evaluating(model):
        for start in batches:
            idx = indices[start : start + IW_BATCH]
            generators = [keyed.generator(IW_NOISE, IW_SEED, int(i)) for i in idx]
            out[start : start + len(idx)] = model.iw_nll(images[idx], k, generators,
                                                         None if labels is None else labels[idx])
            progress.step()
    return out
