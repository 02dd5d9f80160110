"""The run folder and what lives in it: config, metrics, checkpoints, the model file."""
