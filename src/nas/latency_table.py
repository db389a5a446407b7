"""Per-operation cost tables of a DARTS network: measured latency (and exact parameters) of every
candidate op at every shape the network gives it, and an additive predictor for a genotype.

Hardware-aware search (CARS here, ProxylessNAS/FBNet before it) cannot time every candidate: a
population of 64 over 50 generations is thousands of networks. A lookup table (LUT) measures each op
once per (op, channels, stride, input resolution) on the *target* device (CPU with 1/2/4 threads, or
CUDA) and predicts a genotype's latency as

    latency(genotype) = base_ms + sum over cells, over the genotype's edges in that cell, of LUT[op, C, stride, res]

`base_ms` is what the genotype does not change (stem, each cell's input preprocessing, node sums and
concatenation, head); it is calibrated as the median of (measured network - summed ops) over a few
random genotypes, so the prediction is exact on average for this network and device, and additive
and monotone in the ops by construction. The same scheme with op parameter counts is exact:
`build_param_table` gives the parameters of any genotype's network without building it.

Tables are JSON (keys like `sep_conv_3x3|C=36|stride=1|res=32`) with the network and device they
were measured for; `scripts/latency_table.py` builds one and reports how well it predicts measured
networks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.nas.genotypes import Genotype
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

NetFactory = Callable[..., nn.Module]  # genotype=... -> a DARTS evaluation network (NetworkCIFAR)


@dataclass(frozen=True)
class CellShape:
    """Where a cell sits: whether it reduces, its channels per op C, and the resolution of its inputs
    (after preprocessing: the edges from the two inputs see this resolution, the others see it
    halved in a reduction cell)."""

    reduction: bool
    C: int
    resolution: int


def op_key(op: str, C: int, stride: int, resolution: int) -> str:
    return f"{op}|C={C}|stride={stride}|res={resolution}"


def edge_shape(cell: CellShape, source: int) -> tuple[int, int]:
    """(stride, input resolution) of an edge of `cell` reading node `source`."""
    if cell.reduction and source < 2:
        return 2, cell.resolution
    if cell.reduction:
        return 1, (cell.resolution + 1) // 2  # stride-2 ops round up (ceil), as the ops do
    return 1, cell.resolution


def cell_shapes(net_factory: NetFactory, reference: Genotype, image_size: int, in_chans: int) -> list[CellShape]:
    """The cells of `net_factory(genotype=reference)` as built: traced once on the meta device (no
    memory, no compute), so the table follows whatever NetworkCIFAR/NetworkImageNet actually do."""
    shapes: list[CellShape] = []
    with torch.device("meta"):
        net = net_factory(genotype=reference)
    hooks = [
        cell.register_forward_pre_hook(
            lambda module, args: shapes.append(
                CellShape(bool(module.reduction), int(module.preprocess1[1].out_channels), int(args[1].shape[-1]))
            )
        )
        for cell in net.cells
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.empty(1, in_chans, image_size, image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


@dataclass
class OpCostTable:
    """An additive cost model of one network: `base` + the table entries of the genotype's edges.

    `metric` names the unit (`latency_ms` or `params`); `meta` records what it was measured for
    (network config, device, threads, machine), so a table is never used for another network."""

    metric: str
    base: float
    entries: dict[str, float]
    cells: list[CellShape]
    meta: dict = field(default_factory=dict)

    # --- prediction ----------------------------------------------------------------------------
    def entry(self, op: str, C: int, stride: int, resolution: int) -> float:
        key = op_key(op, C, stride, resolution)
        if key not in self.entries:
            raise AutoclsError(
                f"The {self.metric} table has no entry {key}; rebuild it for this network and search space "
                "(scripts/latency_table.py or delete the table file to re-measure)."
            )
        return self.entries[key]

    def edge_cost(self, reduction: bool, op: str, source: int) -> float:
        """The cost of one edge of the genotype's normal or reduction cell, summed over the network's
        cells of that type (a genotype's cell is repeated)."""
        total = 0.0
        for cell in self.cells:
            if cell.reduction == reduction:
                stride, resolution = edge_shape(cell, source)
                total += self.entry(op, cell.C, stride, resolution)
        return total

    def ops_cost(self, genotype: Genotype) -> float:
        return sum(
            self.edge_cost(reduction, op, source)
            for reduction in (False, True)
            for op, source in genotype.cell(reduction)[0]
        )

    def predict(self, genotype: Genotype) -> float:
        return self.base + self.ops_cost(genotype)

    def lowest(self, ops: Sequence[str], steps: int) -> float:
        """The least cost any genotype over `ops` can have (each node's two inputs distinct): per
        node, the two cheapest inputs, each with its cheapest op (the model is additive per edge)."""
        total = self.base
        for reduction in (False, True):
            for node in range(steps):
                per_input = sorted(min(self.edge_cost(reduction, op, j) for op in ops) for j in range(node + 2))
                total += per_input[0] + per_input[1]
        return total

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "base": self.base,
            "cells": [[c.reduction, c.C, c.resolution] for c in self.cells],
            "meta": self.meta,
            "entries": dict(sorted(self.entries.items())),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> OpCostTable:
        return cls(
            metric=str(data["metric"]),
            base=float(data["base"]),
            entries={str(k): float(v) for k, v in data["entries"].items()},
            cells=[CellShape(bool(r), int(c), int(s)) for r, c, s in data["cells"]],
            meta=dict(data.get("meta") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> OpCostTable:
        path = Path(path).expanduser()
        if not path.is_file():
            raise AutoclsError(f"Cost table {path} does not exist; build it with scripts/latency_table.py or leave the path null.")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise AutoclsError(
                f"Cost table {path} is not a table written by src/nas/latency_table.py ({type(err).__name__}); rebuild it."
            ) from None

    def check_network(self, network: dict, path: str | Path | None = None) -> None:
        """One sentence when the table was built for another network than `network` (C, layers, ...)."""
        recorded = self.meta.get("network") or {}
        differing = {k: (recorded.get(k), v) for k, v in network.items() if recorded.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}={old} there but {new} here" for k, (old, new) in differing.items())
            where = f" {path}" if path else ""
            raise AutoclsError(f"Cost table{where} was built for another network ({detail}); rebuild it for this one.")


# --- building tables -----------------------------------------------------------------------------


def _op(op: str, C: int, stride: int) -> nn.Module:
    from src.nas.operations import OPS

    return OPS[op](C, stride, True)  # affine=True: the evaluation network's form of the op


def _distinct_keys(cells: list[CellShape], ops: Sequence[str]) -> list[tuple[str, int, int, int]]:
    keys = set()
    for cell in cells:
        for source in (0, 2):  # the two edge shapes a cell has (from an input, from a node)
            stride, resolution = edge_shape(cell, source)
            keys.update((op, cell.C, stride, resolution) for op in ops)
    return sorted(keys)


def build_param_table(
    net_factory: NetFactory,
    ops: Sequence[str],
    reference: Genotype,
    image_size: int,
    in_chans: int,
    network: dict | None = None,
) -> OpCostTable:
    """Exact parameter counts: each op's count at each shape, and the network's fixed part (the
    network of `reference`, any genotype of the space, minus its ops)."""
    cells = cell_shapes(net_factory, reference, image_size, in_chans)
    entries = {}
    for op, C, stride, resolution in _distinct_keys(cells, ops):
        with torch.device("meta"):
            entries[op_key(op, C, stride, resolution)] = float(sum(p.numel() for p in _op(op, C, stride).parameters()))
    table = OpCostTable("params", 0.0, entries, cells, {"network": network or {}})
    with torch.device("meta"):
        total = sum(p.numel() for p in net_factory(genotype=reference).parameters())
    table.base = float(total) - table.ops_cost(reference)
    return table


def build_latency_table(
    net_factory: NetFactory,
    ops: Sequence[str],
    image_size: int,
    in_chans: int,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    batch_size: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    calibration: Sequence[Genotype] = (),
    network: dict | None = None,
) -> OpCostTable:
    """Measure every (op, C, stride, resolution) the network has on `device` (median of `repeats`
    timed calls after `warmup`, `src.deploy.latency.measure_latency`), then calibrate `base_ms` on
    the `calibration` genotypes of the space (at least one; more average out the measurement noise)."""
    from src.deploy.latency import measure_latency
    from src.utils.machine import describe_machine

    if not calibration:
        raise ValueError("build_latency_table needs at least one calibration genotype")
    cells = cell_shapes(net_factory, calibration[0], image_size, in_chans)
    entries = {}
    for op, C, stride, resolution in _distinct_keys(cells, ops):
        example = torch.randn(batch_size, C, resolution, resolution)
        result = measure_latency(_op(op, C, stride), example, threads=threads, warmup=warmup, repeats=repeats, device=device)
        entries[op_key(op, C, stride, resolution)] = result.median_ms
    meta = {
        "network": network or {},
        "device": device,
        "threads": threads if device == "cpu" else None,
        "batch_size": batch_size,
        "machine": describe_machine(),
        "torch": torch.__version__,
    }
    table = OpCostTable("latency_ms", 0.0, entries, cells, meta)
    residuals = []
    example = torch.randn(batch_size, in_chans, image_size, image_size)
    for genotype in calibration:
        net = net_factory(genotype=genotype)
        measured = measure_latency(net, example, threads=threads, warmup=warmup, repeats=repeats, device=device).median_ms
        residuals.append(measured - table.ops_cost(genotype))
    table.base = float(np.median(residuals))
    table.meta["calibration_residuals_ms"] = [round(r, 4) for r in residuals]
    log.info(
        f"Latency table: {len(entries)} op shapes on {device}"
        + (f" ({threads} threads)" if device == "cpu" else "")
        + f", base {table.base:.3f} ms"
    )
    return table


# --- what search methods use -----------------------------------------------------------------------

# `model.latency` of the DARTS and CARS search configs: a table file to reuse, or how to measure one
LATENCY_DEFAULTS = {"table": None, "device": "cpu", "threads": 1, "warmup": 10, "repeats": 50, "calibration": 3}


class GenotypeCosts:
    """The costs of the network a genotype becomes: `params_m` (exact) and, with a latency table,
    `latency_ms` (predicted). Callable on a genotype, returning a dict; `fixed()` and `edge()` are
    its additive parts (what a derivation that picks edge by edge needs)."""

    def __init__(self, params: OpCostTable, latency: OpCostTable | None = None):
        self.params, self.latency = params, latency

    def _tables(self) -> list[tuple[str, OpCostTable, float]]:
        # (key, table, divisor): parameters are reported in millions
        tables = [("params_m", self.params, 1e6)]
        if self.latency is not None:
            tables.append(("latency_ms", self.latency, 1.0))
        return tables

    def __call__(self, genotype: Genotype) -> dict[str, float]:
        return {key: table.predict(genotype) / unit for key, table, unit in self._tables()}

    def fixed(self) -> dict[str, float]:
        """What every genotype's network costs whatever its ops (stem, preprocessing, head)."""
        return {key: table.base / unit for key, table, unit in self._tables()}

    def edge(self, reduction: bool, op: str, source: int) -> dict[str, float]:
        """The cost of one edge of the normal or reduction cell, over all the network's cells of that type."""
        return {key: table.edge_cost(reduction, op, source) / unit for key, table, unit in self._tables()}

    def lowest(self, ops: Sequence[str], steps: int) -> dict[str, float]:
        return {key: table.lowest(ops, steps) / unit for key, table, unit in self._tables()}


def evaluation_network(**kwargs) -> nn.Module:
    """The default cost network of a search: DARTS's `NetworkCIFAR` (imported late: the cost tables
    do not need the models package otherwise)."""
    from src.models.darts_net import NetworkCIFAR

    return NetworkCIFAR(**kwargs)


def describe_network(cost_net: NetFactory, image_size: int, in_chans: int, steps: int) -> dict:
    """What a cost table is valid for: the cost network's scalar settings and the input shape (a table
    is refused for another network, `OpCostTable.check_network`)."""
    keywords = getattr(cost_net, "keywords", {})
    described = {k: v for k, v in sorted(keywords.items()) if isinstance(v, (bool, int, float, str))}
    # the cells' width (and so the fixed part) depends on the node count
    return {**described, "image_size": int(image_size), "in_chans": int(in_chans), "steps": int(steps)}


def ensure_cost_tables(
    tables: dict[str, OpCostTable],
    cost_net: NetFactory,
    ops: Sequence[str],
    reference: Genotype,
    image_size: int,
    in_chans: int,
    *,
    latency: dict | None = None,
    calibration: Callable[[int], list[Genotype]] | None = None,
    save_dir: Path | None = None,
    who: str = "search",
) -> GenotypeCosts:
    """The costs of `cost_net(genotype=...)` for the search modules (CARS, DARTS), building the tables
    that `tables` (restored from a checkpoint, or empty) lacks, in place: the exact parameter table
    always, the latency table when `latency` (`LATENCY_DEFAULTS` keys) is given: loaded from
    `latency["table"]` and checked against this network, or measured and calibrated on
    `calibration(n)` genotypes and saved into `save_dir/latency_table.json` (reused by
    `model.latency.table=<file>`)."""
    network = describe_network(cost_net, image_size, in_chans, len(reference.normal) // 2)
    if "params" not in tables:
        tables["params"] = build_param_table(cost_net, ops, reference, image_size, in_chans, network)
    if latency is not None and "latency" not in tables:
        cfg = {**LATENCY_DEFAULTS, **latency}
        if cfg["table"]:
            table = OpCostTable.load(cfg["table"])
            table.check_network(network, cfg["table"])
        else:
            table = build_latency_table(
                cost_net,
                ops,
                image_size,
                in_chans,
                device=cfg["device"],
                threads=cfg["threads"],
                warmup=cfg["warmup"],
                repeats=cfg["repeats"],
                calibration=calibration(max(1, int(cfg["calibration"]))) if calibration else [reference],
                network=network,
            )
            if save_dir is not None:
                path = table.save(Path(save_dir) / "latency_table.json")
                log.info(f"{who}: latency table written to {path} (reuse it with model.latency.table={path})")
        tables["latency"] = table
    return GenotypeCosts(tables["params"], tables.get("latency"))
