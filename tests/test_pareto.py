"""Pareto utilities (src/nas/pareto.py) against hand-worked examples and against pymoo."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from src.nas.pareto import (
    associate,
    crowding_distance,
    das_dennis,
    dominates,
    front_ranks,
    non_dominated_sort,
    normalisation_bounds,
    nsga2_select,
    nsga3_select,
    pareto_front,
    pnsga3_select,
    select_survivors,
)

# Hand-worked example, both objectives minimised:
#   A(1,5) B(2,3) C(4,1) | D(3,4) F(2,6) G(4,3.5) | E(5,5)
# D, G are dominated by B, F by A; E by D; so the fronts are {A,B,C}, {D,F,G}, {E}.
NAMES = "ABCDEFG"
POINTS = np.array([[1, 5], [2, 3], [4, 1], [3, 4], [5, 5], [2, 6], [4, 3.5]], dtype=float)


def _names(indices) -> str:
    return "".join(sorted(NAMES[i] for i in indices))


def test_dominates():
    assert dominates([1, 2], [1, 3]) and not dominates([1, 3], [1, 2])
    assert not dominates([1, 2], [1, 2])  # equal: neither dominates
    assert not dominates([1, 3], [2, 2])  # a trade-off


def test_non_dominated_sort_hand_example():
    fronts = non_dominated_sort(POINTS)
    assert [_names(f) for f in fronts] == ["ABC", "DFG", "E"]
    assert front_ranks(POINTS).tolist() == [0, 0, 0, 1, 2, 1, 1]


def test_crowding_distance_hand_example():
    # front {A, B, C}: ranges 3 (f1) and 4 (f2); B's neighbours are A and C: 3/3 + 4/4 = 2
    assert crowding_distance(POINTS[[0, 1, 2]]).tolist() == [np.inf, 2.0, np.inf]
    # front {D, F, G}: D is between F and G in both: (4-2)/2 + (6-3.5)/2.5 = 2
    assert crowding_distance(POINTS[[3, 5, 6]]).tolist() == [2.0, np.inf, np.inf]


def test_nsga2_select_hand_example():
    assert _names(nsga2_select(POINTS, 3)) == "ABC"
    # the second front does not fit: its two extremes (infinite crowding) go first
    assert _names(nsga2_select(POINTS, 5)) == "ABCFG"
    assert _names(nsga2_select(POINTS, 6)) == "ABCDFG"
    assert _names(nsga2_select(POINTS, 7)) == NAMES


def test_nsga3_select_hand_example():
    # Front 0 is {(0,1), (1,0)}: ideal (0,0), those two are the extremes, the hyperplane through them
    # is f1 + f2 = 1, so normalisation is the identity. Front 1 lies beyond them: (0.1,1.2), (1.05,1.05),
    # (1.2,0.1). With directions (0,1), (.5,.5), (1,0) front 0 fills the outer niches, and the one
    # survivor of front 1 must come from the empty middle niche: (1.05, 1.05).
    F = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 1.2], [1.05, 1.05], [1.2, 0.1]])
    assert [f.tolist() for f in non_dominated_sort(F)] == [[0, 1], [2, 3, 4]]
    ideal, nadir = normalisation_bounds(F, np.array([0, 1]))
    np.testing.assert_allclose(ideal, [0, 0])
    np.testing.assert_allclose(nadir, [1, 1])
    directions = das_dennis(2, 2)
    niche, distance = associate(F, directions, ideal, nadir)
    np.testing.assert_allclose(directions[niche], [[0, 1], [1, 0], [0, 1], [0.5, 0.5], [1, 0]])
    np.testing.assert_allclose(distance, [0, 0, 0.1, 0, 0.1], atol=1e-12)
    for seed in range(5):  # no tie is involved: the same answer for every seed
        chosen = nsga3_select(F, 3, np.random.default_rng(seed), directions)
        assert sorted(chosen.tolist()) == [0, 1, 3]
    # NSGA-II keeps an extreme of the split front (infinite crowding distance) instead
    assert sorted(nsga2_select(F, 3).tolist()) == [0, 1, 2]


def test_das_dennis():
    np.testing.assert_allclose(das_dennis(4, 2), [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]])
    points = das_dennis(5, 3)
    assert len(points) == comb(5 + 2, 2)
    np.testing.assert_allclose(points.sum(axis=1), 1.0)
    assert len({tuple(p) for p in points}) == len(points)


# pNSGA-III hand example: (accuracy, params). Plain sorting on (acc up, params down) has fronts
# {P1,P2,P3,P6}, {P4,P7}, {P5}; the protective sorting on (acc up, params up) has {P1,P4,P5}, {P2,P7},
# ... so stage 0 is {P1..P6}: the big, still inaccurate P5 survives where NSGA-II would drop it.
ACC = np.array([0.9, 0.8, 0.7, 0.85, 0.6, 0.5, 0.55])
PARAMS = np.array([3.0, 1.0, 0.5, 4.0, 5.0, 0.4, 2.0])


def test_pnsga3_protects_large_models():
    assert pnsga3_select(ACC, PARAMS, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted(nsga2_select(np.column_stack([-ACC, PARAMS]), 6).tolist()) == [0, 1, 2, 3, 5, 6]
    # a stage that does not fit is sampled: seeded, so repeatable, and always from stage 0
    picks = {tuple(pnsga3_select(ACC, PARAMS, 4, np.random.default_rng(s)).tolist()) for s in range(20)}
    assert all(len(p) == 4 and set(p) <= {0, 1, 2, 3, 4, 5} for p in picks)
    assert len(picks) > 1
    first = pnsga3_select(ACC, PARAMS, 4, np.random.default_rng(3))
    assert first.tolist() == pnsga3_select(ACC, PARAMS, 4, np.random.default_rng(3)).tolist()


def test_select_survivors_constraints_and_methods():
    violation = np.zeros(7)
    violation[[0, 3]] = [2.0, 1.0]  # P1 and P4 break the constraint, P1 by more
    for method in ("nsga2", "nsga3", "pnsga3"):
        chosen = select_survivors(ACC, PARAMS, 4, method, np.random.default_rng(0), violation)
        assert len(set(chosen.tolist())) == 4 and not {0, 3} & set(chosen.tolist())
    # fewer feasible than wanted: all feasible, then the least violating
    chosen = select_survivors(ACC, PARAMS, 6, "nsga3", violation=violation)
    assert sorted(chosen.tolist()) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="unknown selection"):
        select_survivors(ACC, PARAMS, 2, "nsga4")


def test_pareto_front_sorted_by_cost():
    assert pareto_front(ACC, PARAMS).tolist() == [5, 2, 1, 0]


def test_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        non_dominated_sort([[0.1, np.nan]])


# --- against pymoo on random points --------------------------------------------------------------
pymoo = pytest.importorskip("pymoo")


def _random_points(seed: int, n: int, m: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rounded so that ties and duplicate values occur, the cases where sorts tend to differ
    return np.round(rng.random((n, m)), 1 if seed % 2 else 3)


@pytest.mark.parametrize("seed", range(6))
def test_non_dominated_sort_matches_pymoo(seed):
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = _random_points(seed, 60, 2 + seed % 2)
    ours = [sorted(f.tolist()) for f in non_dominated_sort(F)]
    theirs = [sorted(np.asarray(f).tolist()) for f in NonDominatedSorting().do(F)]
    assert ours == theirs


@pytest.mark.parametrize("seed", range(4))
def test_crowding_distance_matches_pymoo(seed):
    from pymoo.operators.survival.rank_and_crowding.metrics import (
        calc_crowding_distance,
    )

    rng = np.random.default_rng(seed)
    F = rng.random((15, 3))  # continuous values: no ties, so neighbour order is unambiguous
    # pymoo averages over the objectives instead of summing: same order, a factor m apart
    np.testing.assert_allclose(crowding_distance(F), calc_crowding_distance(F) * F.shape[1])


def _pymoo_survival(F: np.ndarray, k: int, directions: np.ndarray, seed: int) -> np.ndarray:
    from pymoo.algorithms.moo.nsga3 import ReferenceDirectionSurvival
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem

    pop = Population.new("F", F, "index", np.arange(len(F)))
    problem = Problem(n_var=1, n_obj=F.shape[1])
    survivors = ReferenceDirectionSurvival(directions).do(problem, pop, n_survive=k, random_state=np.random.default_rng(seed))
    return np.asarray(survivors.get("index"), dtype=int)


@pytest.mark.parametrize("seed", range(6))
def test_nsga3_matches_pymoo(seed):
    from pymoo.algorithms.moo.nsga3 import HyperplaneNormalization, associate_to_niches

    n, m, k = 40, 2 + seed % 2, 17
    rng = np.random.default_rng(100 + seed)
    F = rng.random((n, m)) ** 2  # curved, so the split front spreads over several niches
    directions = das_dennis(12 if m == 2 else 5, m)

    # normalisation and niche association: exactly pymoo's
    fronts = non_dominated_sort(F)
    ideal, nadir = normalisation_bounds(F, fronts[0])
    norm = HyperplaneNormalization(m)
    norm.update(F, nds=fronts[0])
    np.testing.assert_allclose(ideal, norm.ideal_point)
    np.testing.assert_allclose(nadir, norm.nadir_point)
    niche, distance = associate(F, directions, ideal, nadir)
    their_niche, their_distance, _ = associate_to_niches(F, directions, norm.ideal_point, norm.nadir_point)
    np.testing.assert_array_equal(niche, their_niche)
    np.testing.assert_allclose(distance, their_distance, atol=1e-12)

    # selection: the same whole fronts, and the same niche occupation (which niches get the last
    # survivors is a random tie-break in both, so only the multiset of counts is fixed)
    ours = nsga3_select(F, k, np.random.default_rng(seed), directions)
    theirs = _pymoo_survival(F, k, directions, seed)
    ranks = front_ranks(F)
    split = ranks[ours].max()
    assert split == ranks[theirs].max()
    assert sorted(i for i in ours if ranks[i] < split) == sorted(i for i in theirs if ranks[i] < split)
    considered = np.flatnonzero(ranks <= split)
    niche_of = dict(zip(considered.tolist(), associate(F[considered], directions, ideal, nadir)[0].tolist()))
    counts = lambda chosen: sorted(np.bincount([niche_of[i] for i in chosen], minlength=len(directions)).tolist())
    assert counts(ours) == counts(theirs)
    assert len(set(ours.tolist())) == k
