"""`python -m vae_dist ...` and `accelerate launch -m vae_dist ...`."""

from vae_dist.cli.app import main

if __name__ == "__main__":
    main()
