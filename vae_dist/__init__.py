"""vae_dist: a distributed trainer for variational autoencoders on MNIST, built on Accelerate. The Python API (see
the README) is exported lazily, so that ``import vae_dist`` (and ``--help``) does not import torch."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainedVAE", "TrainingConfig", "iw_nll", "load", "train"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'vae_dist' has no attribute {name!r}")
    from vae_dist.evaluation import api
    return getattr(api, name)
