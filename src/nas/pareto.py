"""Pareto utilities for multi-objective search: non-dominated sorting and the survivor selections
of NSGA-II, NSGA-III and CARS' pNSGA-III.

Conventions: an objective matrix `F` has one row per candidate and one column per objective, and
every objective is *minimised* (pass `-accuracy`, not accuracy). Selections return the indices of the
`k` survivors in a deterministic order (front by front) and take a `numpy.random.Generator` where they
break ties at random, so a seeded search repeats exactly.

References (read, not copied): Deb et al. 2002, "A fast and elitist multiobjective genetic algorithm:
NSGA-II" (fronts, crowding distance); Deb & Jain 2014, "An evolutionary many-objective optimization
algorithm using reference-point-based nondominated sorting approach" (NSGA-III: normalisation by the
hyperplane through the extreme points, association to reference directions, niching); Yang et al.
2020, "CARS: Continuous Evolution for Efficient Neural Architecture Search" and Huawei's Vega
(pNSGA-III as Vega implements it, see `pnsga3_select`).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def _as_matrix(F) -> np.ndarray:
    F = np.asarray(F, dtype=float)
    if F.ndim == 1:
        F = F[:, None]
    if F.ndim != 2:
        raise ValueError(f"objectives must be a (candidates, objectives) matrix, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ValueError("objectives must be finite (a NaN accuracy or an infinite cost cannot be ranked)")
    return F


def dominates(a, b) -> bool:
    """`a` dominates `b`: no worse in every (minimised) objective and better in at least one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a <= b) and np.any(a < b))


def domination_matrix(F) -> np.ndarray:
    """Boolean (n, n) matrix D with D[i, j] = candidate i dominates candidate j."""
    F = _as_matrix(F)
    no_worse = np.all(F[:, None, :] <= F[None, :, :], axis=2)
    better = np.any(F[:, None, :] < F[None, :, :], axis=2)
    return no_worse & better


def non_dominated_sort(F) -> list[np.ndarray]:
    """Fronts of candidate indices: front 0 is dominated by nobody, front r only by members of earlier
    fronts (Deb et al.'s fast non-dominated sort, with the O(M N^2) comparisons done as one array op).
    Equal rows are in the same front; indices in a front are ascending."""
    D = domination_matrix(F)
    dominated_by = D.sum(axis=0)  # how many candidates dominate each one
    remaining = np.ones(len(D), dtype=bool)
    fronts = []
    while remaining.any():
        front = np.flatnonzero(remaining & (dominated_by == 0))
        fronts.append(front)
        remaining[front] = False
        dominated_by = dominated_by - D[front].sum(axis=0)
    return fronts


def front_ranks(F) -> np.ndarray:
    """The front index of every candidate (0 = Pareto optimal)."""
    F = _as_matrix(F)
    ranks = np.empty(len(F), dtype=int)
    for r, front in enumerate(non_dominated_sort(F)):
        ranks[front] = r
    return ranks


def crowding_distance(F) -> np.ndarray:
    """NSGA-II's crowding distance of the members of one front: per objective, the gap between a
    member's two neighbours divided by the objective's range, summed over objectives; the extremes of
    every objective get infinity so they always survive. An objective with zero range adds nothing."""
    F = _as_matrix(F)
    n, m = F.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(F[:, j], kind="mergesort")
        values = F[order, j]
        span = values[-1] - values[0]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (values[2:] - values[:-2]) / span
    return distance


def nsga2_select(F, k: int) -> np.ndarray:
    """NSGA-II survivors: whole fronts while they fit, then the most isolated members (largest
    crowding distance) of the front that does not fit. Deterministic (stable sort on ties)."""
    F = _as_matrix(F)
    k = _check_k(k, len(F))
    chosen: list[int] = []
    for front in non_dominated_sort(F):
        if len(chosen) + len(front) <= k:
            chosen.extend(front.tolist())
            continue
        crowding = crowding_distance(F[front])
        order = np.argsort(-crowding, kind="stable")
        chosen.extend(front[order[: k - len(chosen)]].tolist())
        break
    return np.asarray(chosen, dtype=int)


# --- NSGA-III ------------------------------------------------------------------------------------


def das_dennis(n_partitions: int, n_objectives: int) -> np.ndarray:
    """Das & Dennis' structured reference points: every vector of `n_objectives` non-negative
    multiples of 1/n_partitions that sums to one (C(p + m - 1, m - 1) of them), as rows."""
    if n_objectives == 1:
        return np.ones((1, 1))
    points = []
    # stars and bars: choosing m - 1 bar positions among p + m - 1 slots gives one composition of p
    for bars in combinations(range(n_partitions + n_objectives - 1), n_objectives - 1):
        edges = (-1, *bars, n_partitions + n_objectives - 1)
        points.append([edges[i + 1] - edges[i] - 1 for i in range(n_objectives)])
    return np.asarray(points, dtype=float) / n_partitions


def default_reference_directions(k: int, n_objectives: int) -> np.ndarray:
    """The coarsest Das-Dennis set with at least `k` directions (about one niche per survivor, the
    paper's recommendation)."""
    p = 1
    while len(das_dennis(p, n_objectives)) < k:
        p += 1
    return das_dennis(p, n_objectives)


def normalisation_bounds(F, first_front: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ideal, nadir) points for NSGA-III's normalisation.

    The ideal point is the per-objective minimum. The nadir point is where the hyperplane through the
    extreme points (each minimises an achievement scalarising function with weight 1 on its axis and
    1e6 elsewhere, searched in the first front) meets the axes; where that plane is degenerate (no
    solution, non-positive intercepts) the worst values of the first front are used instead, and any
    axis whose range is still ~0 takes the worst value of the whole set. This is the paper's rule with
    the fall-backs pymoo uses, so the two agree (tests/test_pareto.py)."""
    F = _as_matrix(F)
    ideal = F.min(axis=0)
    worst = F.max(axis=0)
    front = F[first_front]
    m = F.shape[1]
    weights = np.where(np.eye(m) == 1, 1.0, 1e6)
    shifted = front - ideal
    shifted[shifted < 1e-3] = 0.0  # tiny values count as zero, so an axis's own minimiser wins
    asf = np.max(shifted[None, :, :] * weights[:, None, :], axis=2)  # (axis, member)
    extremes = front[np.argmin(asf, axis=1)]
    nadir = None
    try:
        offsets = extremes - ideal
        plane = np.linalg.solve(offsets, np.ones(m))
        with np.errstate(divide="ignore"):
            intercepts = 1.0 / plane
        if np.allclose(offsets @ plane, 1.0) and np.all(intercepts > 1e-6):
            nadir = np.minimum(ideal + intercepts, worst)
    except np.linalg.LinAlgError:
        pass
    if nadir is None:
        nadir = front.max(axis=0)
    tiny = nadir - ideal <= 1e-6
    nadir[tiny] = worst[tiny]
    return ideal, nadir


def associate(F, directions: np.ndarray, ideal: np.ndarray, nadir: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(niche, distance): the reference direction nearest to each normalised candidate and the
    perpendicular distance from the candidate to that direction's line through the origin."""
    F = _as_matrix(F)
    span = nadir - ideal
    span = np.where(span == 0, 1e-12, span)
    normalised = (F - ideal) / span
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    along = normalised @ unit.T  # (candidate, direction) projection lengths
    # the residual vector, not |x|^2 - projection^2, which cancels catastrophically on the line
    residual = normalised[:, None, :] - along[:, :, None] * unit[None, :, :]
    perpendicular = np.linalg.norm(residual, axis=2)
    niche = np.argmin(perpendicular, axis=1)
    return niche, perpendicular[np.arange(len(F)), niche]


def nsga3_select(
    F, k: int, rng: np.random.Generator | None = None, directions: np.ndarray | None = None
) -> np.ndarray:
    """NSGA-III survivors: whole fronts while they fit; the front that does not fit is thinned by
    niching on reference directions, so the survivors spread along the front instead of crowding
    where the objectives happen to be dense.

    Niching (Deb & Jain, Algorithm 4): repeatedly take the direction with the fewest survivors among
    those that still have a candidate in the splitting front (ties at random); an empty niche takes
    its candidate nearest the direction, an occupied one a random candidate."""
    F = _as_matrix(F)
    k = _check_k(k, len(F))
    rng = rng if rng is not None else np.random.default_rng(0)
    fronts = non_dominated_sort(F)
    chosen: list[int] = []
    last = None
    for front in fronts:
        if len(chosen) + len(front) <= k:
            chosen.extend(front.tolist())
            if len(chosen) == k:
                return np.asarray(chosen, dtype=int)
            continue
        last = front
        break
    if last is None:
        return np.asarray(chosen, dtype=int)

    directions = directions if directions is not None else default_reference_directions(k, F.shape[1])
    ideal, nadir = normalisation_bounds(F, fronts[0])
    considered = np.asarray(chosen + last.tolist(), dtype=int)
    niche, distance = associate(F[considered], directions, ideal, nadir)
    niche_count = np.bincount(niche[: len(chosen)], minlength=len(directions))
    last_niche, last_distance = niche[len(chosen) :], distance[len(chosen) :]
    available = np.ones(len(last), dtype=bool)

    while len(chosen) < k:
        open_niches = np.unique(last_niche[available])
        counts = niche_count[open_niches]
        fewest = open_niches[counts == counts.min()]
        for j in rng.permutation(fewest)[: k - len(chosen)]:
            members = np.flatnonzero(available & (last_niche == j))
            if niche_count[j] == 0:
                pick = members[np.argmin(last_distance[members])]
            else:
                pick = rng.choice(members)
            available[pick] = False
            niche_count[j] += 1
            chosen.append(int(last[pick]))
    return np.asarray(chosen, dtype=int)


# --- pNSGA-III (CARS) ----------------------------------------------------------------------------


def pnsga3_select(accuracy, costs, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """CARS' protective selection, as Huawei's Vega implements it (`CARS_NSGA`).

    Early in a one-shot search, small architectures train fastest, so a plain (accuracy, cost) front
    keeps eliminating large ones before they catch up (the paper's "small model trap"). pNSGA-III
    therefore sorts twice per cost: once on (high accuracy, low cost) and once on (high accuracy,
    *high* cost), and admits candidates stage by stage: stage r is the union of the r-th fronts of all
    sortings. A stage that does not fit entirely is sampled at random (as in Vega).

    (Vega minimises 1/accuracy and 1/cost; dominance depends only on the order within each
    objective, so -accuracy and -cost give the same fronts without dividing by zero.)

    Args:
        accuracy: (n,) accuracies, higher is better.
        costs: (n,) or (n, c) costs such as parameters or latency, lower is better.
        k: number of survivors.
    """
    accuracy = np.asarray(accuracy, dtype=float).ravel()
    costs = _as_matrix(costs)
    if len(costs) != len(accuracy):
        raise ValueError(f"{len(accuracy)} accuracies but {len(costs)} cost rows")
    k = _check_k(k, len(accuracy))
    rng = rng if rng is not None else np.random.default_rng(0)
    sortings = []
    for j in range(costs.shape[1]):
        sortings.append(non_dominated_sort(np.column_stack([-accuracy, costs[:, j]])))
        sortings.append(non_dominated_sort(np.column_stack([-accuracy, -costs[:, j]])))
    selected = np.zeros(len(accuracy), dtype=bool)
    chosen: list[int] = []
    for stage in range(max(len(s) for s in sortings)):
        members = np.unique(np.concatenate([s[stage] for s in sortings if stage < len(s)]))
        new = members[~selected[members]]
        if len(chosen) + len(new) > k:
            new = np.sort(rng.choice(new, size=k - len(chosen), replace=False))
        selected[new] = True
        chosen.extend(new.tolist())
        if len(chosen) == k:
            break
    return np.asarray(chosen, dtype=int)


# --- constraints and one entry point -------------------------------------------------------------

SELECTIONS = ("nsga2", "nsga3", "pnsga3")


def select_survivors(
    accuracy,
    costs,
    k: int,
    method: str = "nsga3",
    rng: np.random.Generator | None = None,
    violation=None,
) -> np.ndarray:
    """The `k` survivors of a population by (accuracy up, every cost down).

    `violation` (n,) is how far each candidate exceeds its constraints (0 = feasible). Deb's
    constraint domination applies: feasible candidates are ranked among themselves with `method`,
    and only when fewer than `k` are feasible do the least violating infeasible ones fill up."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; use one of {SELECTIONS}")
    accuracy = np.asarray(accuracy, dtype=float).ravel()
    costs = _as_matrix(costs)
    k = _check_k(k, len(accuracy))
    violation = np.zeros(len(accuracy)) if violation is None else np.asarray(violation, dtype=float).ravel()
    feasible = np.flatnonzero(violation <= 0)
    if len(feasible) <= k:
        infeasible = np.flatnonzero(violation > 0)
        fill = infeasible[np.argsort(violation[infeasible], kind="stable")][: k - len(feasible)]
        return np.concatenate([feasible, fill]).astype(int)
    acc, cost = accuracy[feasible], costs[feasible]
    if method == "pnsga3":
        picked = pnsga3_select(acc, cost, k, rng)
    elif method == "nsga3":
        picked = nsga3_select(np.column_stack([-acc, cost]), k, rng)
    else:
        picked = nsga2_select(np.column_stack([-acc, cost]), k)
    return feasible[picked]


def pareto_front(accuracy, costs) -> np.ndarray:
    """Indices of the non-dominated candidates by (accuracy up, costs down), sorted by the first cost."""
    costs = _as_matrix(costs)
    F = np.column_stack([-np.asarray(accuracy, dtype=float).ravel(), costs])
    front = non_dominated_sort(F)[0]
    return front[np.lexsort((F[front, 0], costs[front, 0]))]  # by cost, then by accuracy


def _check_k(k: int, n: int) -> int:
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} candidates")
    return k
