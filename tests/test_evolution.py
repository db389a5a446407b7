"""Evolutionary operators (src/nas/evolution.py): members stay valid, encodings round-trip,
sampling is seeded and uniform enough, constraints end in one sentence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from src.nas.evolution import (
    Constraints,
    DartsSpace,
    make_offspring,
    random_genotype,
    rng_from_state,
    rng_state,
    sample_population,
)
from src.nas.genotypes import NAMED_GENOTYPES, Genotype, parse_genotype
from src.utils.errors import AutoclsError

SPACE = DartsSpace()


def _assert_valid(g: Genotype, space: DartsSpace = SPACE) -> None:
    assert isinstance(g, Genotype)
    assert space.contains(g), g
    # the string form re-parses to the same member (what a front file stores)
    assert space.from_string(g.to_string()) == g
    assert parse_genotype(g.to_json()) == g


def test_sample_is_valid_seeded_and_spread():
    rng = np.random.default_rng(0)
    members = [SPACE.sample(rng) for _ in range(300)]
    for g in members:
        _assert_valid(g)
    assert len(set(members)) == len(members)  # a space of ~1e25 members: no repeats expected
    again = [SPACE.sample(np.random.default_rng(0)) for _ in range(1)]
    assert again[0] == members[0]
    # every op and every admissible input occurs, roughly uniformly (7 ops, 300 * 16 edges)
    ops = Counter(op for g in members for op, _ in g.normal + g.reduce)
    assert set(ops) == set(SPACE.ops)
    expected = 300 * 16 / len(SPACE.ops)
    assert all(abs(count - expected) < 0.15 * expected for count in ops.values()), ops
    last_node_inputs = Counter(src for g in members for _, src in g.normal[6:8])
    assert set(last_node_inputs) == {0, 1, 2, 3, 4}


def test_random_genotype_is_seeded():
    assert random_genotype(3) == random_genotype(3)
    assert random_genotype(3) != random_genotype(4)
    _assert_valid(random_genotype(3))


def test_space_size():
    # per cell: prod over nodes i=0..3 of C(i+2, 2) * 7^2 = (1*3*6*10) * 7^8
    assert SPACE.size() == (180 * 7**8) ** 2
    assert DartsSpace(ops=("skip_connect",), steps=1).size() == 1


def test_mutation_keeps_genotypes_valid_and_changes_them():
    rng = np.random.default_rng(1)
    for _ in range(300):
        parent = SPACE.sample(rng)
        child = SPACE.mutate(parent, rng)
        _assert_valid(child)
        assert child != parent
    # a low rate changes few edges: one in the common case
    parent = SPACE.canonical(NAMED_GENOTYPES["DARTS_V2"])
    diffs = [int((SPACE.encode(SPACE.mutate(parent, rng)) != SPACE.encode(parent)).sum()) for _ in range(100)]
    assert np.median(diffs) <= 2


def test_mutation_in_a_one_op_space_moves_inputs():
    space = DartsSpace(ops=("sep_conv_3x3",), steps=3)
    rng = np.random.default_rng(2)
    g = space.sample(rng)
    for _ in range(50):
        child = space.mutate(g, rng)
        _assert_valid(child, space)
        assert child != g
        g = child


def test_crossover_takes_whole_nodes_from_the_parents():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = SPACE.sample(rng), SPACE.sample(rng)
        child = SPACE.crossover(a, b, rng)
        _assert_valid(child)
        for reduction in (False, True):
            ca, cb, cc = a.cell(reduction)[0], b.cell(reduction)[0], child.cell(reduction)[0]
            for i in range(SPACE.steps):
                assert cc[2 * i : 2 * i + 2] in (ca[2 * i : 2 * i + 2], cb[2 * i : 2 * i + 2])
    a = SPACE.sample(rng)
    assert SPACE.crossover(a, a, rng) == a


def test_encode_decode_round_trip():
    rng = np.random.default_rng(4)
    for _ in range(50):
        g = SPACE.sample(rng)
        codes = SPACE.encode(g)
        assert codes.shape == (32,)
        assert SPACE.decode(codes) == g
    with pytest.raises(AutoclsError, match="32 integers"):
        SPACE.decode([0, 1])


def test_canonical_form_identifies_equal_cells():
    g = NAMED_GENOTYPES["DARTS_V2"]
    swapped = Genotype(
        [g.normal[1], g.normal[0], *g.normal[2:]], g.normal_concat, g.reduce, g.reduce_concat
    )
    assert swapped != g and SPACE.canonical(swapped) == SPACE.canonical(g)


def test_unknown_op_in_space_is_one_sentence():
    with pytest.raises(AutoclsError, match="must be a non-empty list of DARTS ops"):
        DartsSpace(ops=("conv_7x7",))


def test_offspring_are_new_valid_and_feasible():
    rng = np.random.default_rng(5)
    parents = [SPACE.sample(rng) for _ in range(8)]
    no_5x5 = lambda g: all("5x5" not in op for op, _ in g.normal + g.reduce)
    parents = [p for p in parents if no_5x5(p)] or [SPACE.canonical(NAMED_GENOTYPES["DARTS_V2"])]
    children = make_offspring(SPACE, parents, 12, rng, is_feasible=no_5x5)
    assert len(children) == 12 and len(set(children)) == 12
    assert not set(children) & set(parents)
    for child in children:
        _assert_valid(child)
        assert no_5x5(child)


def test_offspring_in_an_exhausted_space_returns_fewer():
    space = DartsSpace(ops=("skip_connect",), steps=1)  # exactly one member
    rng = np.random.default_rng(0)
    only = space.sample(rng)
    assert make_offspring(space, [only], 3, rng, max_tries=50) == []


def test_sample_population_seeded_and_constraint_error():
    pop = sample_population(SPACE, 6, np.random.default_rng(7))
    assert pop == sample_population(SPACE, 6, np.random.default_rng(7))
    with pytest.raises(AutoclsError, match=r"^Only 0 of 4 random candidates met the constraints"):
        sample_population(SPACE, 4, np.random.default_rng(7), is_feasible=lambda g: False, max_tries=100)


def test_constraints():
    c = Constraints(max_params_m=1.0, max_latency_ms=10.0)
    assert c.violation({"params_m": 0.5, "latency_ms": 10.0}) == 0
    assert c.violation({"params_m": 1.5, "latency_ms": 12.0}) == pytest.approx(0.7)
    assert Constraints().violation({"params_m": 99}) == 0
    c.check_reachable({"params_m": 0.9, "latency_ms": 3.0}, fix="use a smaller net")
    with pytest.raises(AutoclsError) as err:
        c.check_reachable({"params_m": 1.2}, fix="make model.net smaller")
    message = str(err.value)
    assert message.startswith("No candidate can meet max_params_m=1") and message.count(". ") == 0
    assert "1.2 M parameters" in message and message.endswith("make model.net smaller.")
    with pytest.raises(AutoclsError, match="must be positive"):
        Constraints(max_latency_ms=0).bounds()


def test_rng_state_round_trip():
    rng = np.random.default_rng(11)
    rng.random(5)
    clone = rng_from_state(rng_state(rng))
    assert np.array_equal(rng.random(4), clone.random(4))
