"""vae_dist: a distributed trainer for variational autoencoders on MNIST, built on Accelerate."""

__version__ = "0.1.0"
