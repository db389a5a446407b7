"""From architecture weights to a discrete `Genotype` (DARTS, Liu et al. 2019, section 2.4).

For every intermediate node, the two strongest incoming edges are kept, each with its strongest
operation other than 'none'; an edge's strength is the softmax weight of that best op. With PC-DARTS
edge normalisation (Xu et al. 2020) each op weight is first multiplied by the edge's weight (a softmax
of the node's edge parameters `betas` over its incoming edges), as the PC-DARTS code derives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from src.nas.genotypes import PRIMITIVES, Genotype


def num_edges(steps: int) -> int:
    """Edges of a cell with `steps` intermediate nodes: node i (from 0) reads the 2 + i nodes before it."""
    return sum(2 + i for i in range(steps))


def node_slices(steps: int) -> list[slice]:
    """The rows of the (edges, ops) weight matrix that belong to each intermediate node."""
    slices, start = [], 0
    for i in range(steps):
        slices.append(slice(start, start + 2 + i))
        start += 2 + i
    return slices


def edge_softmax(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """PC-DARTS edge normalisation: a softmax of `betas` (one per edge) over each node's incoming
    edges, so every node's edge weights sum to 1."""
    return torch.cat([F.softmax(betas[rows], dim=-1) for rows in node_slices(steps)])


def op_weights(alphas: torch.Tensor, betas: torch.Tensor | None = None, steps: int = 4) -> torch.Tensor:
    """(edges, ops) mixture weights: the softmax of `alphas` over ops, times the normalised edge weight
    when `betas` are given."""
    weights = F.softmax(alphas, dim=-1)
    if betas is not None:
        weights = weights * edge_softmax(betas, steps).unsqueeze(-1)
    return weights


def derive_cell(weights: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES) -> list[tuple[str, int]]:
    """The genotype edges of one cell from its (edges, ops) weights: per node, the two input edges
    whose best non-'none' op is strongest (strongest first), each with that op."""
    if weights.shape != (num_edges(steps), len(primitives)):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit {steps} steps and {len(primitives)} ops")
    weights = weights.detach().float().cpu().clone()
    if "none" in primitives:
        weights[:, list(primitives).index("none")] = -float("inf")  # 'none' is never chosen
    best_weight, best_op = weights.max(dim=-1)
    edges = []
    for rows in node_slices(steps):
        strength = best_weight[rows]
        # stable sort: of two equally strong edges the one from the earlier node wins
        order = sorted(range(len(strength)), key=lambda j: -float(strength[j]))[:2]
        edges.extend((primitives[int(best_op[rows][j])], j) for j in order)
    return edges


def derive_genotype(
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    steps: int = 4,
    primitives: Sequence[str] = PRIMITIVES,
    betas_normal: torch.Tensor | None = None,
    betas_reduce: torch.Tensor | None = None,
    multiplier: int | None = None,
) -> Genotype:
    """The genotype of the architecture parameters (logits, as the supernet holds them). The cell
    output concatenates the last `multiplier` nodes (default: all `steps`), as the supernet does."""
    multiplier = steps if multiplier is None else multiplier
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=derive_cell(op_weights(alphas_normal, betas_normal, steps), steps, primitives),
        normal_concat=concat,
        reduce=derive_cell(op_weights(alphas_reduce, betas_reduce, steps), steps, primitives),
        reduce_concat=concat,
    )
