"""Per-op cost tables (src/nas/latency_table.py): exact parameters, an additive and monotone latency
predictor, JSON round trips, and one-sentence errors."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from src.models.darts_net import NetworkCIFAR
from src.nas.evolution import DartsSpace
from src.nas.genotypes import Genotype
from src.nas.latency_table import (
    CellShape,
    GenotypeCosts,
    OpCostTable,
    build_latency_table,
    build_param_table,
    cell_shapes,
    edge_shape,
)
from src.utils.errors import AutoclsError

SPACE = DartsSpace()
NET = partial(NetworkCIFAR, C=4, layers=5, num_classes=10, in_chans=3)
NETWORK = {"C": 4, "layers": 5, "image_size": 16}


@pytest.fixture(scope="module")
def param_table() -> OpCostTable:
    return build_param_table(NET, SPACE.ops, SPACE.reference(), 16, 3, NETWORK)


@pytest.fixture(scope="module")
def latency_table() -> OpCostTable:
    calibration = [SPACE.sample(np.random.default_rng(s)) for s in range(2)]
    torch.manual_seed(0)
    return build_latency_table(NET, SPACE.ops, 16, 3, threads=1, warmup=1, repeats=3, calibration=calibration, network=NETWORK)


def test_cell_shapes_follow_the_network():
    # 5 cells, reductions at 5 // 3 = 1 and 2 * 5 // 3 = 3, C doubling there; resolution halving after them
    assert cell_shapes(NET, SPACE.reference(), 16, 3) == [
        CellShape(False, 4, 16),
        CellShape(True, 8, 16),
        CellShape(False, 8, 8),
        CellShape(True, 16, 8),
        CellShape(False, 16, 4),
    ]
    reduction = CellShape(True, 8, 15)
    assert edge_shape(reduction, 1) == (2, 15) and edge_shape(reduction, 3) == (1, 8)  # ceil(15 / 2)


def test_param_table_is_exact(param_table):
    rng = np.random.default_rng(0)
    for _ in range(8):
        g = SPACE.sample(rng)
        assert param_table.predict(g) == sum(p.numel() for p in NET(genotype=g).parameters())


def test_param_lowest_is_the_parameter_free_genotype(param_table):
    pools = Genotype([("max_pool_3x3", j) for _ in range(4) for j in (0, 1)], range(2, 6),
                     [("avg_pool_3x3", j) for _ in range(4) for j in (0, 1)], range(2, 6))
    assert param_table.lowest(SPACE.ops, SPACE.steps) == param_table.predict(pools) == param_table.base
    rng = np.random.default_rng(1)
    assert all(param_table.predict(SPACE.sample(rng)) >= param_table.base for _ in range(20))


def test_latency_predictor_is_additive_and_monotone(latency_table):
    assert latency_table.meta["device"] == "cpu" and latency_table.meta["threads"] == 1
    assert all(v > 0 for v in latency_table.entries.values())
    rng = np.random.default_rng(2)
    g = SPACE.sample(rng)
    # additive: base + the entries of the genotype's edges, cell by cell
    by_hand = latency_table.base
    for cell in latency_table.cells:
        edges = g.reduce if cell.reduction else g.normal
        for op, source in edges:
            stride, res = edge_shape(cell, source)
            by_hand += latency_table.entries[f"{op}|C={cell.C}|stride={stride}|res={res}"]
    assert latency_table.predict(g) == pytest.approx(by_hand)
    # monotone: swapping one edge's op changes the prediction by exactly the difference of its entries
    op, source = g.normal[0]
    for other in SPACE.ops:
        swapped = Genotype([(other, source), *g.normal[1:]], g.normal_concat, g.reduce, g.reduce_concat)
        delta = latency_table.edge_cost(False, other, source) - latency_table.edge_cost(False, op, source)
        assert latency_table.predict(swapped) - latency_table.predict(g) == pytest.approx(delta)
    # the calibrated base makes the prediction exact on average over the calibration genotypes
    assert np.median(latency_table.meta["calibration_residuals_ms"]) == pytest.approx(latency_table.base, abs=1e-3)
    lowest = latency_table.lowest(SPACE.ops, SPACE.steps)
    assert all(latency_table.predict(SPACE.sample(rng)) >= lowest for _ in range(50))


def test_json_round_trip(latency_table, param_table, tmp_path):
    for table in (latency_table, param_table):
        path = table.save(tmp_path / f"{table.metric}.json")
        loaded = OpCostTable.load(path)
        assert loaded.to_dict() == table.to_dict()
        g = SPACE.sample(np.random.default_rng(3))
        assert loaded.predict(g) == table.predict(g)
    assert json.loads((tmp_path / "latency_ms.json").read_text())["metric"] == "latency_ms"


def test_genotype_costs(latency_table, param_table):
    costs = GenotypeCosts(param_table, latency_table)
    g = SPACE.sample(np.random.default_rng(4))
    got = costs(g)
    assert got["params_m"] == param_table.predict(g) / 1e6 and got["latency_ms"] == latency_table.predict(g)
    assert GenotypeCosts(param_table)(g).keys() == {"params_m"}


def test_errors_are_one_sentence(latency_table, tmp_path):
    with pytest.raises(AutoclsError, match="does not exist; build it with scripts/latency_table.py"):
        OpCostTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"metric": "latency_ms"}')
    with pytest.raises(AutoclsError, match="is not a table written by src/nas/latency_table.py"):
        OpCostTable.load(tmp_path / "bad.json")
    with pytest.raises(AutoclsError, match=r"built for another network \(layers=5 there but 20 here\)"):
        latency_table.check_network({**NETWORK, "layers": 20}, "lut.json")
    latency_table.check_network(NETWORK)  # the same network passes
    with pytest.raises(AutoclsError, match=r"has no entry sep_conv_3x3\|C=99"):
        latency_table.entry("sep_conv_3x3", 99, 1, 16)
