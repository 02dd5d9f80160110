"""Evaluation, pictures and the Python API over a trained model."""
