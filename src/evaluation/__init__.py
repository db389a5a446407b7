"""Evaluation extras: test-time augmentation, confusion matrix, per-class accuracy, calibration error."""
