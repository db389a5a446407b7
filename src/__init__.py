"""autocls: image-classification AutoML on PyTorch Lightning + Hydra."""
