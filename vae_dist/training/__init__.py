"""Training: train(config) orders the components; the Learner owns the loop."""
