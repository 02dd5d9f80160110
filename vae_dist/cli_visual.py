"""Commands that use a trained model to make pictures (sample, reconstruct, interpolate)."""

from __future__ import annotations

from vae_dist.cli import app  # noqa: F401
