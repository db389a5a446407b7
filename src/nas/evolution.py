"""Evolutionary operators over search spaces: encode, sample, mutate, cross over, keep feasible.

Two spaces share the operators here: `DartsSpace` (the DARTS cell space, members are `Genotype`s;
used by CARS and by `nas=random`) and `src.nas.backbone_space.BackboneSpace` (ResNet-style encodings,
used by BackboneNAS). A space is anything with `sample(rng)`, `mutate(member, rng)`,
`crossover(a, b, rng)`, `canonical(member)` and `to_string(member)`/`from_string(text)`.

Offspring follow Vega's CARS recipe: a quarter mutants of a random parent, a quarter crossovers of two
random parents, the rest fresh random members (which keeps exploring the space while the population
converges); duplicates of existing members and members that break the constraints are redrawn.

All randomness comes from a `numpy.random.Generator` the caller owns: its state goes into checkpoints,
so a resumed search draws exactly what the uninterrupted one would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from src.nas.genotypes import PRIMITIVES, Genotype, parse_genotype
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


class SearchSpace(Protocol):
    def sample(self, rng: np.random.Generator) -> Any: ...
    def mutate(self, member: Any, rng: np.random.Generator) -> Any: ...
    def crossover(self, a: Any, b: Any, rng: np.random.Generator) -> Any: ...
    def canonical(self, member: Any) -> Any: ...
    def to_string(self, member: Any) -> str: ...
    def from_string(self, text: str) -> Any: ...


# --- the DARTS cell space ------------------------------------------------------------------------


@dataclass(frozen=True)
class DartsSpace:
    """The discrete DARTS space: for each of the two cell types, `steps` nodes, each summing two
    edges from two *different* earlier nodes (the two cell inputs count), each edge one of `ops`
    ('none' excluded: a derived DARTS cell never has it). The output concatenates all intermediate
    nodes, as in DARTS. Members are `Genotype`s in canonical form (each node's two edges sorted by
    input), so equal architectures compare and hash equal.

    Args:
        ops: Candidate operations (default: every DARTS primitive but 'none').
        steps: Intermediate nodes per cell (4 in DARTS).
        mutation_rate: Probability that an edge changes in `mutate` (at least one always does).
    """

    ops: tuple[str, ...] = tuple(p for p in PRIMITIVES if p != "none")
    steps: int = 4
    mutation_rate: float = 1 / 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        bad = [op for op in self.ops if op not in PRIMITIVES or op == "none"]
        if bad or not self.ops:
            allowed = ", ".join(p for p in PRIMITIVES if p != "none")
            raise AutoclsError(f"Search space ops {list(self.ops)} must be a non-empty list of DARTS ops ({allowed}).")
        if self.steps < 1:
            raise AutoclsError(f"Search space steps={self.steps} must be at least 1.")

    @property
    def concat(self) -> tuple[int, ...]:
        return tuple(range(2, self.steps + 2))

    def size(self) -> int:
        """How many distinct genotypes the space holds: per node C(i+2, 2) input pairs times ops^2,
        over all nodes of both cells."""
        per_cell = 1
        for i in range(self.steps):
            inputs = i + 2
            per_cell *= inputs * (inputs - 1) // 2 * len(self.ops) ** 2
        return per_cell**2

    # --- members -------------------------------------------------------------------------------
    def canonical(self, genotype: Genotype) -> Genotype:
        def cell(edges):
            nodes = [sorted(edges[2 * i : 2 * i + 2], key=lambda e: (e[1], e[0])) for i in range(len(edges) // 2)]
            return [edge for node in nodes for edge in node]

        return Genotype(cell(genotype.normal), genotype.normal_concat, cell(genotype.reduce), genotype.reduce_concat)

    def contains(self, genotype: Genotype) -> bool:
        for edges, concat in (genotype.cell(False), genotype.cell(True)):
            if len(edges) != 2 * self.steps or tuple(concat) != self.concat:
                return False
            if any(op not in self.ops for op, _ in edges):
                return False
            if any(edges[2 * i][1] == edges[2 * i + 1][1] for i in range(self.steps)):
                return False
        return True

    def to_string(self, genotype: Genotype) -> str:
        return genotype.to_string()

    def from_string(self, text: str) -> Genotype:
        return self.canonical(parse_genotype(text))

    def reference(self) -> Genotype:
        """A fixed member: every node reads the two cell inputs with the first op (a reference
        network for cost tables)."""
        edges = [(self.ops[0], j) for _ in range(self.steps) for j in (0, 1)]
        return Genotype(edges, self.concat, edges, self.concat)

    # --- integer encoding ----------------------------------------------------------------------
    def encode(self, genotype: Genotype) -> np.ndarray:
        """A flat integer vector: per cell (normal, then reduce), per edge, (op index, input node)."""
        codes = []
        for edges, _ in (genotype.cell(False), genotype.cell(True)):
            for op, source in edges:
                codes += [self.ops.index(op), source]
        return np.asarray(codes, dtype=np.int64)

    def decode(self, codes: Sequence[int]) -> Genotype:
        codes = [int(c) for c in codes]
        half = len(codes) // 2
        if len(codes) != 8 * self.steps:
            raise AutoclsError(f"An encoded genotype of this space has {8 * self.steps} integers, got {len(codes)}.")

        def cell(part):
            return [(self.ops[part[i]], part[i + 1]) for i in range(0, len(part), 2)]

        return self.canonical(Genotype(cell(codes[:half]), self.concat, cell(codes[half:]), self.concat))

    # --- operators -----------------------------------------------------------------------------
    def _random_node(self, node: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        sources = rng.choice(node + 2, size=2, replace=False)
        return [(self.ops[int(rng.integers(len(self.ops)))], int(s)) for s in sources]

    def sample(self, rng: np.random.Generator) -> Genotype:
        """A uniformly random member: each node's input pair and both ops drawn uniformly."""
        normal = [e for i in range(self.steps) for e in self._random_node(i, rng)]
        reduce = [e for i in range(self.steps) for e in self._random_node(i, rng)]
        return self.canonical(Genotype(normal, self.concat, reduce, self.concat))

    def mutate(self, genotype: Genotype, rng: np.random.Generator) -> Genotype:
        """Each edge changes with probability `mutation_rate` (at least one edge always changes): half
        the time its op becomes another op, otherwise its input another node that the node's other
        edge does not read already."""
        cells = [list(genotype.normal), list(genotype.reduce)]
        n_edges = 2 * self.steps
        # an edge can change if another op exists or its node has a third input (node 0 has only two)
        mutable = np.array([[len(self.ops) > 1 or e // 2 > 0 for e in range(n_edges)]] * 2)
        flips = (rng.random((2, n_edges)) < self.mutation_rate) & mutable
        if not flips.any() and mutable.any():
            candidates = np.argwhere(mutable)
            flips[tuple(candidates[int(rng.integers(len(candidates)))])] = True
        for c, e in zip(*np.nonzero(flips)):
            op, source = cells[c][e]
            node, partner = e // 2, cells[c][e ^ 1][1]
            free_inputs = [j for j in range(node + 2) if j not in (source, partner)]
            other_ops = [o for o in self.ops if o != op]
            if other_ops and (not free_inputs or rng.random() < 0.5):
                cells[c][e] = (other_ops[int(rng.integers(len(other_ops)))], source)
            else:
                cells[c][e] = (op, free_inputs[int(rng.integers(len(free_inputs)))])
        return self.canonical(Genotype(cells[0], self.concat, cells[1], self.concat))

    def crossover(self, a: Genotype, b: Genotype, rng: np.random.Generator) -> Genotype:
        """Uniform crossover by node: each node of each cell comes whole (both edges) from one parent,
        so every child node is a valid node."""
        cells = []
        for reduction in (False, True):
            edges_a, edges_b = a.cell(reduction)[0], b.cell(reduction)[0]
            take_b = rng.random(self.steps) < 0.5
            cells.append([edge for i in range(self.steps) for edge in (edges_b if take_b[i] else edges_a)[2 * i : 2 * i + 2]])
        return self.canonical(Genotype(cells[0], self.concat, cells[1], self.concat))


def random_genotype(seed: int = 0, ops: Sequence[str] | None = None, steps: int = 4) -> Genotype:
    """One uniformly random DARTS genotype, fixed by `seed` (the `nas=random` baseline)."""
    space = DartsSpace(ops=tuple(ops) if ops else DartsSpace.ops, steps=steps)
    return space.sample(np.random.default_rng(seed))


# --- constraints ---------------------------------------------------------------------------------

COST_UNITS = {"params_m": "M parameters", "latency_ms": "ms", "flops_m": "MFLOPs"}


@dataclass(frozen=True)
class Constraints:
    """Upper bounds on a member's costs (None: no bound). Costs are dicts with keys such as
    `params_m` and `latency_ms`."""

    max_params_m: float | None = None
    max_latency_ms: float | None = None

    def bounds(self) -> dict[str, float]:
        out = {}
        if self.max_params_m is not None:
            out["params_m"] = float(self.max_params_m)
        if self.max_latency_ms is not None:
            out["latency_ms"] = float(self.max_latency_ms)
        for key, value in out.items():
            if not value > 0:
                raise AutoclsError(f"max_{key}={value} must be positive; remove it to search without that bound.")
        return out

    def violation(self, costs: dict[str, float]) -> float:
        """0 for a feasible member, else the summed relative excess over the bounds (how far off it is)."""
        return float(sum(max(0.0, costs[key] / bound - 1.0) for key, bound in self.bounds().items()))

    def check_reachable(self, lowest: dict[str, float], fix: str) -> None:
        """One sentence if even the cheapest member of the space (`lowest`: the least cost any member
        can have, per key) breaks a bound, since then no search can succeed."""
        for key, bound in self.bounds().items():
            if key in lowest and lowest[key] > bound:
                unit = COST_UNITS.get(key, "")
                raise AutoclsError(
                    f"No candidate can meet max_{key}={bound:g}: the cheapest network of this search space "
                    f"already has {lowest[key]:.4g} {unit}; raise max_{key} or {fix}."
                )


# --- populations ---------------------------------------------------------------------------------


def sample_population(
    space: SearchSpace,
    n: int,
    rng: np.random.Generator,
    is_feasible: Callable[[Any], bool] = lambda member: True,
    max_tries: int | None = None,
) -> list:
    """`n` distinct random members that pass `is_feasible` (rejection sampling). One sentence when the
    constraints are so tight that `max_tries` draws (default 200 per member) found too few."""
    max_tries = max_tries or 200 * max(n, 1)
    members: list = []
    seen: set = set()
    tries = 0
    while len(members) < n and tries < max_tries:
        tries += 1
        member = space.sample(rng)
        if member in seen:
            continue
        seen.add(member)
        if is_feasible(member):
            members.append(member)
    if len(members) < n:
        raise AutoclsError(
            f"Only {len(members)} of {n} random candidates met the constraints after {tries} draws; "
            "loosen max_params_m/max_latency_ms or shrink the population."
        )
    return members


def make_offspring(
    space: SearchSpace,
    parents: Sequence,
    n: int,
    rng: np.random.Generator,
    is_feasible: Callable[[Any], bool] = lambda member: True,
    mutation_prob: float = 0.25,
    crossover_prob: float = 0.25,
    exclude: Iterable = (),
    max_tries: int | None = None,
) -> list:
    """`n` new members: each is a mutant of a random parent (probability `mutation_prob`), a crossover
    of two random parents (`crossover_prob`) or a fresh random member (the rest), redrawn while it
    repeats a parent, another child or anything in `exclude`, or is infeasible. Returns fewer than
    `n` (with a warning) only if `max_tries` draws were not enough, e.g. in a tiny space."""
    if not parents:
        raise ValueError("make_offspring needs at least one parent")
    max_tries = max_tries or 100 * max(n, 1)
    taken = set(parents) | set(exclude)
    children: list = []
    tries = 0
    while len(children) < n and tries < max_tries:
        tries += 1
        draw = rng.random()
        if draw < mutation_prob:
            child = space.mutate(parents[int(rng.integers(len(parents)))], rng)
        elif draw < mutation_prob + crossover_prob:
            a, b = rng.integers(len(parents), size=2)
            child = space.crossover(parents[int(a)], parents[int(b)], rng)
        else:
            child = space.sample(rng)
        if child in taken or not is_feasible(child):
            continue
        taken.add(child)
        children.append(child)
    if len(children) < n:
        log.warning(f"Only {len(children)} of {n} new feasible offspring after {tries} draws; the search space is nearly exhausted.")
    return children


def rng_state(rng: np.random.Generator) -> dict:
    """The generator's state as plain data (for checkpoints)."""
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
