"""vae_dist: a distributed trainer for variational autoencoders on MNIST, built on Accelerate.

The Python API (see the README), exported lazily so that ``import vae_dist`` (and ``--help``) does not import torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainedVAE", "TrainingConfig", "iw_nll", "load", "train"]


def __getattr__(name: str) -> Any:
    if name == "TrainingConfig":
        from vae_dist.config import TrainingConfig

        return TrainingConfig
    if name in __all__:
        from vae_dist.evaluation import api

        return getattr(api, name)
    raise AttributeError(f"module 'vae_dist' has no attribute {name!r}")
