"""The trainer's epoch previews import the pictures from here; they live in vae_dist.evaluation.evaluate."""

from vae_dist.evaluation.evaluate import prior_samples, reconstructions  # noqa: F401
