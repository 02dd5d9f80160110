"""Hostile resumes and model files, in process on synthetic data: a hand-edited checkpoint
position is skipped for the older checkpoint, --max-steps at or below the checkpoint's
step is handled, and a model file's config cannot make the loader allocate a huge model."""

from __future__ import annotations
