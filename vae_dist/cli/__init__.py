"""The command line (`vae-dist`, `python -m vae_dist`): the commands in app.py, the picture commands in pictures.py."""

from vae_dist.cli.app import main  # noqa: F401
