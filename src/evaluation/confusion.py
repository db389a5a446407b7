"""Confusion matrix and per-class accuracy of a test run, as CSV and PNG."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Recall of each class (diagonal over row sums); NaN for a class absent from the test split."""
    support = matrix.sum(dim=1).double()
    return torch.where(support > 0, matrix.diagonal().double() / support.clamp(min=1), torch.nan)


def write_per_class_csv(matrix: torch.Tensor, class_names: Sequence[str], path: Path) -> None:
    accuracy = per_class_accuracy(matrix)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_index", "class_name", "support", "correct", "accuracy"])
        for i, name in enumerate(class_names):
            acc = float(accuracy[i])
            writer.writerow([i, name, int(matrix[i].sum()), int(matrix[i, i]), "" if math.isnan(acc) else f"{acc:.6f}"])


def write_confusion_csv(matrix: torch.Tensor, class_names: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix.tolist()):
            writer.writerow([name, *row])


def plot_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised colours (each row: where that class's images went), counts written in the cells
    when there are at most 20 classes, class names on the axes when there are at most 40."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    n = len(class_names)
    rows = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
        ax.set_yticks(range(n), class_names)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
