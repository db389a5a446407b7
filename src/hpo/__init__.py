"""Hyperparameter and augmentation search: the Optuna sweeper's parts (search space, storage, reports),
the pruning callback that runs inside trials, and population-based augmentation (PBA)."""
