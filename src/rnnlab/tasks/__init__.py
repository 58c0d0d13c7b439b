"""LightningModules: loss, metrics, optimisers; they build their net from hyperparameters."""
