"""Hardware bounds (max_params_m / max_latency_ms) in all three searches: the DARTS derivation within
bounds (src/nas/derive.py derive_within_bounds) against a hand-worked case and brute force, the DARTS
module wiring, CARS and BackboneNAS under a latency bound, and one sentence when no candidate can
meet a bound."""

from __future__ import annotations

from functools import partial
from itertools import combinations, product

import numpy as np
import pytest
import torch

from src.models.darts_net import NetworkCIFAR
from src.nas.derive import (
    derive_genotype,
    derive_within_bounds,
    node_slices,
    op_weights,
)
from src.nas.evolution import Constraints, DartsSpace
from src.nas.genotypes import PRIMITIVES, Genotype
from src.nas.latency_table import GenotypeCosts, OpCostTable, build_param_table
from src.utils.errors import AutoclsError

pytestmark = pytest.mark.usefixtures("one_thread")

# the network a genotype becomes: 5 cells of 4 channels on 16x16 RGB, cells of 2 nodes
NET = partial(NetworkCIFAR, C=4, layers=5, num_classes=10, in_chans=3)
STEPS = 2


def _params(genotype: Genotype) -> int:
    return sum(p.numel() for p in NET(genotype=genotype).parameters())


def _param_costs(ops=tuple(p for p in PRIMITIVES if p != "none")) -> GenotypeCosts:
    reference = DartsSpace(ops=ops, steps=STEPS).reference()
    return GenotypeCosts(build_param_table(NET, ops, reference, 16, 3, {"C": 4, "layers": 5}))


def _logits(rows: dict[int, dict[str, float]]) -> torch.Tensor:
    """(edges, ops) alphas of a 2-node cell: 0 everywhere but the given (row, op) logits."""
    alphas = torch.zeros(5, len(PRIMITIVES))
    for row, ops in rows.items():
        for op, value in ops.items():
            alphas[row, PRIMITIVES.index(op)] = value
    return alphas


# --- the derivation --------------------------------------------------------------------------------

def test_a_params_bound_trades_the_weakest_expensive_choice_for_a_free_one():
    # rows: 2<-0, 2<-1, 3<-0, 3<-1, 3<-2. Edge 2<-0 prefers sep_conv_5x5 only barely over
    # skip_connect (softmax 0.454 vs 0.411); every other kept edge is a conv far ahead of the rest
    normal = _logits({0: {"sep_conv_5x5": 3.0, "skip_connect": 2.9}, 1: {"sep_conv_3x3": 3.0},
                      2: {"dil_conv_5x5": 3.0}, 3: {"dil_conv_3x3": 2.0}, 4: {"sep_conv_5x5": 2.5}})
    reduce = _logits({row: {"max_pool_3x3": 3.0} for row in range(5)})  # pools: no parameters
    unconstrained = derive_genotype(normal, reduce, STEPS)
    assert unconstrained.normal == (("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("dil_conv_5x5", 0), ("sep_conv_5x5", 2))
    # swapping that one edge for skip_connect loses the least weight; a bound that only the swap meets
    expected = Genotype([("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_5x5", 0), ("sep_conv_5x5", 2)],
                        [2, 3], unconstrained.reduce, [2, 3])
    bound = _params(expected) / 1e6  # exactly at the bound meets it
    assert _params(unconstrained) / 1e6 > bound

    costs = _param_costs()
    got = derive_within_bounds(normal, reduce, costs, Constraints(max_params_m=bound), STEPS)
    assert got == expected
    # a bound the unconstrained genotype meets changes nothing
    loose = derive_within_bounds(normal, reduce, costs, Constraints(max_params_m=_params(unconstrained) / 1e6), STEPS)
    assert loose == unconstrained


def _hand_latency(params: OpCostTable, free_ops_ms: float = 0.1) -> OpCostTable:
    """A latency table by hand over the same op shapes: 1 ms per conv (dilated 1.5), `free_ops_ms`
    for pools and skips, doubled at stride 2, plus 2 ms fixed; other ratios than the parameters', so
    the two bounds pull apart."""
    def ms(key: str) -> float:
        op, stride = key.split("|")[0], 2 if "stride=2" in key else 1
        return stride * (1.5 if op.startswith("dil") else 1.0 if "conv" in op else free_ops_ms)

    return OpCostTable("latency_ms", 2.0, {key: ms(key) for key in params.entries}, params.cells)


def _best_by_enumeration(normal, reduce, costs: GenotypeCosts, constraints: Constraints, primitives, betas=(None, None)):
    """The most mixture weight any genotype meeting the bounds keeps, by trying every genotype."""
    ops = [p for p in primitives if p != "none"]
    keys = list(constraints.bounds())
    per_cell = []
    for reduction, alphas, beta in ((False, normal, betas[0]), (True, reduce, betas[1])):
        weights = op_weights(alphas, beta, STEPS).double().numpy()
        nodes = [[((o1, j1), (o2, j2)) for j1, j2 in combinations(range(i + 2), 2) for o1, o2 in product(ops, repeat=2)]
                 for i in range(STEPS)]
        cells = [a + b for a, b in product(*nodes)]
        rows = [s.start for s in node_slices(STEPS)]
        score = np.array([sum(weights[rows[k // 2] + j, primitives.index(op)] for k, (op, j) in enumerate(c)) for c in cells])
        cost = np.array([[sum(costs.edge(reduction, op, j)[key] for op, j in c) for key in keys] for c in cells])
        per_cell.append((score, cost))
    (s_n, c_n), (s_r, c_r) = per_cell
    fixed = np.array([costs.fixed()[key] for key in keys])
    total = fixed + c_n[:, None, :] + c_r[None, :, :]
    limit = np.array([constraints.bounds()[key] for key in keys])
    feasible = (total <= limit * (1 + 1e-12)).all(axis=-1)
    return float(np.where(feasible, s_n[:, None] + s_r[None, :], -np.inf).max())


def _kept_weight(genotype: Genotype, normal, reduce, primitives, betas=(None, None)) -> float:
    total = 0.0
    for edges, alphas, beta in ((genotype.normal, normal, betas[0]), (genotype.reduce, reduce, betas[1])):
        weights = op_weights(alphas, beta, STEPS).double().numpy()
        total += sum(weights[node_slices(STEPS)[k // 2].start + j, primitives.index(op)] for k, (op, j) in enumerate(edges))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derivation_within_both_bounds_keeps_the_most_weight(seed):
    # 4 ops, 2 nodes per cell: 768 choices per cell, every genotype tried against the derivation
    primitives = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_5x5")
    params = _param_costs(primitives[1:])
    costs = GenotypeCosts(params.params, _hand_latency(params.params))
    gen = torch.Generator().manual_seed(seed)
    normal, reduce = (1.5 * torch.randn(5, len(primitives), generator=gen) for _ in range(2))
    betas = (torch.randn(5, generator=gen), torch.randn(5, generator=gen)) if seed == 2 else (None, None)  # PC-DARTS
    unconstrained = derive_genotype(normal, reduce, STEPS, primitives, *betas)
    high, low = costs(unconstrained), costs.lowest(primitives[1:], STEPS)
    constraints = Constraints(max_params_m=low["params_m"] + 0.4 * (high["params_m"] - low["params_m"]),
                              max_latency_ms=low["latency_ms"] + 0.5 * (high["latency_ms"] - low["latency_ms"]))
    assert constraints.violation(high) > 0

    got = derive_within_bounds(normal, reduce, costs, constraints, STEPS, primitives, *betas)
    assert constraints.violation(costs(got)) == 0
    assert _params(got) / 1e6 <= constraints.max_params_m * (1 + 1e-12)  # the real network, not the table
    best = _best_by_enumeration(normal, reduce, costs, constraints, primitives, betas)
    assert _kept_weight(got, normal, reduce, primitives, betas) == pytest.approx(best, rel=1e-9)


def test_derivation_bounds_no_genotype_can_meet_are_one_sentence():
    params = _param_costs()
    costs = GenotypeCosts(params.params, _hand_latency(params.params))
    alphas = torch.randn(5, len(PRIMITIVES), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AutoclsError) as err:
        derive_within_bounds(alphas, alphas, costs, Constraints(max_params_m=1e-5), STEPS)
    message = str(err.value)
    assert message.startswith("No candidate can meet max_params_m=1e-05: the cheapest network of this search space already has")
    assert message.endswith("raise max_params_m or search a smaller network (model.cost_net.C / model.cost_net.layers).")
    assert message.count(". ") == 0

    # on a device where pools and skips are slower than convs, the fewest parameters (no convs) and the
    # lowest latency (all convs) exclude each other: each bound alone is reachable, both together not
    costs = GenotypeCosts(params.params, _hand_latency(params.params, free_ops_ms=3.0))
    low = costs.lowest([p for p in PRIMITIVES if p != "none"], STEPS)
    both = Constraints(max_params_m=low["params_m"] * 1.0001, max_latency_ms=low["latency_ms"] * 1.5)
    with pytest.raises(AutoclsError) as err:
        derive_within_bounds(alphas, alphas, costs, both, STEPS)
    message = str(err.value)
    assert message.startswith(f"No genotype of this search space meets max_params_m={both.max_params_m:g} and max_latency_ms=")
    assert message.endswith("together; raise one of the bounds or search a smaller network (model.cost_net.C / model.cost_net.layers).")


# --- the DARTS module ------------------------------------------------------------------------------

DARTS = ["experiment=digits_darts", "logger=none", "model.net.C=4", "model.net.layers=3", "model.net.steps=2",
         "model.net.multiplier=2", "data.batch_size=32", "+trainer.limit_val_batches=1", "test=false"]
DIGITS_NET = partial(NetworkCIFAR, C=8, layers=5, num_classes=10, in_chans=1)  # digits_darts' cost_net


def test_darts_search_derives_within_a_params_bound(compose_train, tmp_path):
    from hydra.utils import instantiate

    from src.train import train

    module = instantiate(compose_train(DARTS, out=tmp_path / "probe").model)
    module.ensure_costs()
    ops = [p for p in module.net.primitives if p != "none"]
    bound = round(module.costs.lowest(ops, 2)["params_m"] * 1.05, 6)  # room for one small conv at most

    out = tmp_path / "run"
    extra = ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "callbacks.model_checkpoint.save_top_k=-1"]
    metrics = train(compose_train([*DARTS, *extra, f"model.max_params_m={bound}"], out=out))
    assert metrics["search/params_m"] <= bound
    for epoch in (0, 1):
        genotype = Genotype.from_json((out / "genotypes" / f"epoch_{epoch:03d}.json").read_text())
        assert sum(p.numel() for p in DIGITS_NET(genotype=genotype).parameters()) / 1e6 <= bound
    # the bound did bite: the plain derivation of the same alphas breaks it
    ckpt = torch.load(out / "checkpoints" / "epoch_001.ckpt", map_location="cpu", weights_only=False)
    alphas = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if "alphas" in k}
    plain = derive_genotype(alphas["alphas_normal"], alphas["alphas_reduce"], steps=2)
    assert sum(p.numel() for p in DIGITS_NET(genotype=plain).parameters()) / 1e6 > bound
    assert set(ckpt["darts_cost_tables"]) == {"params"}


def test_darts_search_with_a_latency_bound_uses_the_lookup_table(compose_train, tmp_path):
    from hydra.utils import instantiate

    from src.train import train

    fast = ["model.latency.warmup=1", "model.latency.repeats=3", "model.latency.calibration=1"]
    probe = instantiate(compose_train([*DARTS, *fast, "model.max_latency_ms=1000"], out=tmp_path / "probe").model)
    probe.ensure_costs()  # measures the table of the cost network on this CPU
    table = probe.tables["latency"].save(tmp_path / "lut.json")
    ops = [p for p in probe.net.primitives if p != "none"]
    low = probe.costs.lowest(ops, 2)["latency_ms"]
    high = probe.costs(probe.net.genotype())["latency_ms"]
    bound = low + 0.3 * (max(high, 1.5 * low) - low)

    out = tmp_path / "run"
    overrides = [*DARTS, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", f"model.latency.table={table}",
                 f"model.max_latency_ms={bound}"]
    metrics = train(compose_train(overrides, out=out))
    genotype = Genotype.from_json((out / "genotype.json").read_text())
    assert metrics["search/latency_ms"] == pytest.approx(OpCostTable.load(table).predict(genotype)) and metrics["search/latency_ms"] <= bound
    assert not (out / "latency_table.json").exists()  # the given table was used, none measured
    # checkpoints keep the table: a resumed search derives with the same one, not a re-measured one
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["darts_cost_tables"]["latency"] == OpCostTable.load(table).to_dict()
    resumed = instantiate(compose_train([*DARTS, f"model.max_latency_ms={bound}"], out=tmp_path / "resumed").model)
    resumed.on_load_checkpoint(ckpt)
    resumed.ensure_costs()  # no table given and none measured: the checkpoint's
    assert resumed.tables["latency"].to_dict() == ckpt["darts_cost_tables"]["latency"]


def test_darts_search_stops_at_once_when_no_genotype_can_meet_a_bound(compose_train, tmp_path):
    from src.train import train

    with pytest.raises(AutoclsError) as err:
        train(compose_train([*DARTS, "trainer.fast_dev_run=true", "model.max_params_m=0.00001"]))
    message = str(err.value)
    assert message.startswith("No candidate can meet max_params_m=1e-05: the cheapest network of this search space already has")
    assert message.count(". ") == 0 and message.endswith(".")
    assert not (tmp_path / "genotype.json").exists()  # nothing trained


# --- CARS and BackboneNAS under a latency bound -------------------------------------------------

CARS = ["experiment=digits_cars", "logger=none", "model.net.C=4", "model.net.layers=3", "model.net.steps=2",
        "model.net.multiplier=2", "model.cost_net.C=4", "model.cost_net.layers=3", "model.population_size=4",
        "model.latency.warmup=1", "model.latency.repeats=3", "model.latency.calibration=1"]


def test_cars_honours_a_latency_bound(compose_train, tmp_path):
    from hydra.utils import instantiate

    probe = instantiate(compose_train([*CARS, "model.objectives=[latency_ms]"], out=tmp_path).model)
    probe._ensure_ready()
    table = probe.tables["latency"].save(tmp_path / "lut.json")
    rng = np.random.default_rng(0)
    latencies = sorted(probe.member_costs(probe.space.sample(rng))["latency_ms"] for _ in range(16))
    bound = latencies[len(latencies) // 2]  # about half of the random genotypes break it

    bounded = instantiate(compose_train([*CARS, f"model.latency.table={table}", f"model.max_latency_ms={bound}"], out=tmp_path).model)
    bounded._ensure_ready()
    assert all(bounded.member_costs(g)["latency_ms"] <= bound for g in bounded.population)
    offspring = bounded.space.sample(np.random.default_rng(99))
    assert bounded.is_feasible(offspring) == (bounded.member_costs(offspring)["latency_ms"] <= bound)

    impossible = instantiate(compose_train([*CARS, f"model.latency.table={table}", "model.max_latency_ms=0.000001"], out=tmp_path).model)
    with pytest.raises(AutoclsError) as err:
        impossible._ensure_ready()
    message = str(err.value)
    assert message.startswith("No candidate can meet max_latency_ms=1e-06: the cheapest network of this search space already has")
    assert message.endswith("ms; raise max_latency_ms or search a smaller network (model.cost_net.C / model.cost_net.layers).")


BACKBONE = ["model=backbone_nas", "model/net=backbone_space", "logger=none", "model.net.depths=[1,2]",
            "model.net.widths=[8,16]", "model.net.stem_width=8", "model.population_size=3",
            "model.latency.warmup=1", "model.latency.repeats=3"]


def test_backbone_nas_honours_a_latency_bound(compose_train, tmp_path):
    from hydra.utils import instantiate

    probe = instantiate(compose_train([*BACKBONE, "model.objectives=[latency_ms]"], out=tmp_path).model)
    rng = np.random.default_rng(0)
    latencies = sorted(probe.member_costs(probe.space.sample(rng))["latency_ms"] for _ in range(8))
    bound = latencies[len(latencies) // 2]

    bounded = instantiate(compose_train([*BACKBONE, f"model.max_latency_ms={bound}"], out=tmp_path).model)
    bounded.cost_cache.update(probe.cost_cache)  # the same measurements: the check below is not a re-measurement
    bounded._ensure_ready()
    assert all(bounded.member_costs(e)["latency_ms"] <= bound for e in bounded.pending)

    impossible = instantiate(compose_train([*BACKBONE, "model.max_latency_ms=0.000001"], out=tmp_path).model)
    with pytest.raises(AutoclsError) as err:
        impossible._ensure_ready()
    message = str(err.value)
    assert message.startswith("No candidate can meet max_latency_ms=1e-06: the cheapest network of this search space already has")
    assert message.count(". ") == 0 and "widen the space" in message
