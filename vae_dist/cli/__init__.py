"""The command line (`vae-dist`, `python -m vae_dist`): its commands are in app.py."""

from vae_dist.cli.app import main  # noqa: F401
