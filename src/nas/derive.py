"""From architecture weights to a discrete `Genotype` (DARTS, Liu et al. 2019, section 2.4).

For every intermediate node, the two strongest incoming edges are kept, each with its strongest
operation other than 'none'; an edge's strength is the softmax weight of that best op. With PC-DARTS
edge normalisation (Xu et al. 2020) each op weight is first multiplied by the edge's weight (a softmax
of the node's edge parameters `betas` over its incoming edges), as the PC-DARTS code derives it.

That choice is the genotype whose kept (edge, op) weights have the largest sum, node by node.
`derive_within_bounds` keeps that objective under hardware bounds (`max_params_m`,
`max_latency_ms` on the network the genotype becomes, costs from `src.nas.latency_table`): the
genotype that meets them with the largest summed weight, so a bound trades the weakest choices
(an expensive op barely ahead of a cheap one) for cheaper ones first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from src.nas.genotypes import PRIMITIVES, Genotype
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from src.nas.evolution import Constraints
    from src.nas.latency_table import GenotypeCosts


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


# --- derivation under hardware bounds ------------------------------------------------------------

SEARCH_BUDGET = 200_000  # partial genotypes the exact derivation may visit (typical: under a few hundred)


@dataclass
class _NodeChoices:
    """The ways one node can read two distinct inputs with one op each that are worth considering:
    its Pareto set of (summed weight of the two (edge, op)s: higher is better, summed costs: lower is
    better; one column per bounded cost), best weight first."""

    edges: list[tuple[tuple[str, int], tuple[str, int]]]
    score: np.ndarray  # (choices,)
    cost: np.ndarray  # (choices, bounded costs)


def _node_choices(weights: np.ndarray, rows: slice, ops: Sequence[str], columns: Sequence[int], edge_cost) -> _NodeChoices:
    edges, score, cost = [], [], []
    for j1, j2 in combinations(range(rows.stop - rows.start), 2):
        for (o1, c1), (o2, c2) in product(zip(ops, columns), repeat=2):
            edges.append(((o1, j1), (o2, j2)))
            score.append(weights[rows.start + j1, c1] + weights[rows.start + j2, c2])
            cost.append(edge_cost(o1, j1) + edge_cost(o2, j2))
    score, cost = np.asarray(score), np.asarray(cost)
    # a choice that another beats on weight without costing more in any bound can never be the best
    kept: list[int] = []
    for i in np.lexsort((*cost.T[::-1], -score)):  # best weight first, then cheapest
        if not any(score[k] >= score[i] and (cost[k] <= cost[i]).all() for k in kept):
            kept.append(int(i))
    return _NodeChoices([edges[k] for k in kept], score[kept], cost[kept])


def derive_within_bounds(
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    costs: GenotypeCosts,
    constraints: Constraints,
    steps: int = 4,
    primitives: Sequence[str] = PRIMITIVES,
    betas_normal: torch.Tensor | None = None,
    betas_reduce: torch.Tensor | None = None,
    multiplier: int | None = None,
    fix: str = "search a smaller network (model.cost_net.C / model.cost_net.layers)",
) -> Genotype:
    """The genotype of the architecture parameters whose network meets `constraints` and keeps the
    most mixture weight; the plain `derive_genotype` when that already meets them.

    DARTS's derivation maximises the summed weight of the kept (edge, op)s node by node; under bounds
    on additive costs (`costs`, a `GenotypeCosts` of the network the genotype becomes, covering every
    op but 'none') the nodes compete for the budget: a multiple-choice knapsack. It is solved exactly
    by depth-first branch and bound over each node's Pareto set of choices (best weight first, cut
    where even the best remaining weights cannot beat the best genotype found, or the cheapest
    remaining costs break a bound). One sentence, naming `fix`, when no genotype can meet the bounds."""
    genotype = derive_genotype(alphas_normal, alphas_reduce, steps, primitives, betas_normal, betas_reduce, multiplier)
    bounds = constraints.bounds()
    if not bounds or constraints.violation(costs(genotype)) == 0:
        return genotype
    ops = [p for p in primitives if p != "none"]
    constraints.check_reachable(costs.lowest(ops, steps), fix)  # the cheapest network of the space breaks one

    keys = list(bounds)
    limit = np.array([bounds[k] for k in keys]) * (1 + 1e-12)  # a genotype exactly at a bound meets it
    columns = [list(primitives).index(op) for op in ops]
    weights, nodes = {}, []  # nodes: the normal cell's, then the reduction cell's
    for reduction, alphas, betas in ((False, alphas_normal, betas_normal), (True, alphas_reduce, betas_reduce)):
        weights[reduction] = op_weights(_cpu(alphas), _cpu(betas), steps).double().numpy()
        edge_cost = _edge_cost_lookup(costs, reduction, keys)
        nodes += [_node_choices(weights[reduction], rows, ops, columns, edge_cost) for rows in node_slices(steps)]
    fixed = costs.fixed()
    # what the nodes after node n can add at best (weight) and at least (each cost)
    best_after = np.append(np.cumsum([node.score[0] for node in nodes][::-1])[::-1], 0.0)[1:]
    cheapest_after = np.vstack([np.cumsum([node.cost.min(axis=0) for node in nodes][::-1], axis=0)[::-1], np.zeros(len(keys))])[1:]

    best: dict = {"score": -np.inf, "picks": None}
    picks: list[int] = []
    visited = 0

    def search(n: int, score: float, cost: np.ndarray) -> None:
        nonlocal visited
        visited += 1
        if n == len(nodes):
            best.update(score=score, picks=list(picks))
            return
        node = nodes[n]
        for k in range(len(node.score)):
            if score + node.score[k] + best_after[n] <= best["score"] or visited >= SEARCH_BUDGET:
                return  # choices are sorted by weight: no later one can do better either
            total = cost + node.cost[k]
            if (total + cheapest_after[n] <= limit).all():
                picks.append(k)
                search(n + 1, score + node.score[k], total)
                picks.pop()

    search(0, 0.0, np.array([fixed[k] for k in keys]))
    if best["picks"] is None:  # each bound alone is reachable (checked above), but not all together
        asked = " and ".join(f"max_{k}={bounds[k]:g}" for k in keys)
        if visited >= SEARCH_BUDGET:
            raise AutoclsError(f"The derivation found no genotype that meets {asked} in {visited} tries; loosen one of the bounds or {fix}.")
        raise AutoclsError(f"No genotype of this search space meets {asked} together; raise one of the bounds or {fix}.")
    if visited >= SEARCH_BUDGET:
        log.warning(f"Derivation under {bounds} stopped after {visited} partial genotypes; the genotype meets the bounds but may not keep the most weight.")

    cells = {False: [], True: []}
    for n, k in enumerate(best["picks"]):
        reduction, rows = n >= steps, node_slices(steps)[n % steps]
        strength = {edge: weights[reduction][rows.start + edge[1], list(primitives).index(edge[0])] for edge in nodes[n].edges[k]}
        # strongest edge first, as derive_cell orders them (ties: the earlier input)
        cells[reduction] += sorted(strength, key=lambda e: (-strength[e], e[1]))
    return Genotype(cells[False], genotype.normal_concat, cells[True], genotype.reduce_concat)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float().cpu()


def _edge_cost_lookup(costs: GenotypeCosts, reduction: bool, keys: Sequence[str]):
    """edge_cost(op, source) -> the bounded costs of that edge as an array (looked up once each)."""
    cache: dict[tuple[str, int], np.ndarray] = {}

    def edge_cost(op: str, source: int) -> np.ndarray:
        if (op, source) not in cache:
            cost = costs.edge(reduction, op, source)
            cache[op, source] = np.array([cost[k] for k in keys])
        return cache[op, source]

    return edge_cost
