"""A picture of a DARTS search's state: the mixture weights of every edge as a heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from src.nas.derive import node_slices, op_weights


def edge_labels(steps: int) -> list[str]:
    """'2<-0', '2<-1', '3<-0', ...: the row labels of a (edges, ops) weight matrix."""
    return [f"{i + 2}<-{j}" for i, rows in enumerate(node_slices(steps)) for j in range(rows.stop - rows.start)]


def plot_alphas(
    alphas: dict[str, torch.Tensor],
    path: str | Path,
    primitives: Sequence[str],
    steps: int,
    betas: dict[str, torch.Tensor | None] | None = None,
    title: str = "",
) -> Path:
    """Save a heatmap per cell type (`alphas`: {"normal": logits, "reduce": logits}) of the mixture
    weights softmax(alpha) (times the PC-DARTS edge weights when `betas` are given), one row per edge
    and one column per op, each cell annotated with its weight; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    betas = betas or {}
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 0.35 * len(edge_labels(steps)) + 2.2))
    axes = [axes] if len(alphas) == 1 else list(axes)
    for ax, (cell, logits) in zip(axes, alphas.items()):
        weights = op_weights(logits.detach().float().cpu(), _cpu(betas.get(cell)), steps).numpy()
        # colours span this cell's own range: early in a search the weights differ by a few percent
        image = ax.imshow(weights, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(primitives)), list(primitives), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(weights.shape[0]), edge_labels(steps), fontsize=8)
        ax.set_title(f"{cell} cell", fontsize=10)
        for (row, col), value in _cells(weights):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < (weights.min() + weights.max()) / 2 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float().cpu()


def _cells(weights):
    for row in range(weights.shape[0]):
        for col in range(weights.shape[1]):
            yield (row, col), float(weights[row, col])
