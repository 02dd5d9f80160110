"""The command line (`vae-dist`, `python -m vae_dist`): its commands are in app.py."""
