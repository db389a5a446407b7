"""CARS (Yang et al. 2020, "CARS: Continuous Evolution for Efficient Neural Architecture Search"), as
Huawei's Vega runs it, as one LightningModule.

A population of DARTS genotypes shares the weights of one supernet (`src.nas.supernet.DartsSupernet`):

* every training step runs one member's path through the supernet (`net(x, genotype)`), the member
  drawn uniformly from the population; during the first `warmup_epochs` the path is a uniformly
  random genotype of the whole space instead (Vega's `forward_random`), so that all weights get
  trained before members are compared;
* every validation evaluates each member, plus, in an evolving epoch, as many new offspring
  (mutations, crossovers, fresh samples; `src.nas.evolution`) with the shared weights, and keeps
  `population_size` of them by NSGA-II/III or CARS' pNSGA-III on (accuracy, costs)
  (`src.nas.pareto`); the costs are the exact parameters and/or the latency predicted by a
  per-op lookup table measured on the target device (`src.nas.latency_table`) of the network the
  genotype becomes (`cost_net`, by default the paper's 20-cell, 36-channel CIFAR network);
* `max_params_m` / `max_latency_ms` are hard constraints: members that break them are never drawn,
  and a bound that not even the cheapest network of the space meets ends the run with one sentence.

Outputs in `<run dir>/cars/`: per epoch `population_EEE.csv` (every evaluated candidate),
`front_EEE.csv` and `front_EEE.png` (the population's Pareto front), and `pareto_front.json` (the
latest front, with test accuracies after testing), which `experiment=cifar_cars_train
model.net.front=...` trains from. The population, its accuracies, the random generator and the cost
tables are saved in every checkpoint (`checkpoint["cars"]`) and restored on resume, so a resumed
search continues exactly where it stopped.

Logged: `train/loss`; `val/acc` (best member), `val/acc_mean`, `val/acc_best`, `val/front_size`;
`search/train_s`, `search/eval_s` (seconds of the epoch's training and evaluation); `test/acc` (the
test accuracy of the member with the best validation accuracy, shared weights), `test/acc_front_mean`.
With `logger=wandb` every epoch's candidates and front are also W&B tables (`search/population`,
`search/front`) beside the front's plot (`search/front_plot`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric

from src.nas import front as front_io
from src.nas.evolution import (
    Constraints,
    DartsSpace,
    make_offspring,
    rng_from_state,
    rng_state,
    sample_population,
)
from src.nas.genotypes import Genotype
from src.nas.latency_table import (
    LATENCY_DEFAULTS,
    GenotypeCosts,
    OpCostTable,
    describe_network,
    ensure_cost_tables,
    evaluation_network,
)
from src.nas.pareto import SELECTIONS, pareto_front, select_survivors
from src.nas.wandb_tables import log_rows
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

OBJECTIVES = ("params_m", "latency_ms")
CHECKPOINT_KEY = "cars"


class CarsSearchLitModule(pl.LightningModule):
    """See the module docstring.

    Args:
        net: The supernet (`DartsSupernet`); its primitives (without 'none') and steps define the space.
        loss, optimizer, scheduler: As for `ClassifierLitModule` (the optimizer sees the supernet's weights).
        cost_net: Partial of the evaluation network a genotype becomes (`NetworkCIFAR` without its
            genotype); its parameters and latency are the costs. None: the supernet's own C and layers.
        image_size, in_chans: Input shape for the cost tables (from the data).
        population_size: Members kept after each selection (Vega: num_individual).
        offspring_ratio: New candidates per evolving epoch, as a fraction of the population (Vega: expand).
        warmup_epochs: Epochs of random-path training before members are selected.
        evolve_every: Evolve every this many epochs after warm-up (Vega: ga_interval).
        selection: nsga2, nsga3 or pnsga3 (CARS' protective selection; see `src.nas.pareto`).
        objectives: Costs minimised beside maximising accuracy: params_m and/or latency_ms.
        mutation_prob, crossover_prob: Shares of mutants and crossovers among offspring (the rest is random).
        mutation_rate: Per-edge change probability of a mutation.
        paths_per_step: Members trained per step on the same batch (their losses averaged).
        eval_bn: How members are evaluated: "batch" normalises with each evaluation batch's own
            statistics (the running statistics of shared BN layers mix every path ever trained and
            misjudge any single one; SPOS/OFA recalibrate them for the same reason), "running" uses
            the running statistics (what Vega does).
        max_params_m, max_latency_ms: Hard bounds on the costs (None: unbounded).
        latency: The latency table: `table` (a JSON file to load; null: measure one into the run dir),
            `device` (cpu or cuda), `threads`, `warmup`, `repeats`, `calibration` (random genotypes
            measured whole to calibrate the fixed part).
        seed: Seed of the search's own random generator (population, offspring, paths).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        cost_net: partial | None = None,
        image_size: int = 32,
        in_chans: int = 3,
        population_size: int = 32,
        offspring_ratio: float = 1.0,
        warmup_epochs: int = 10,
        evolve_every: int = 1,
        selection: str = "pnsga3",
        objectives: Sequence[str] = ("params_m",),
        mutation_prob: float = 0.25,
        crossover_prob: float = 0.25,
        mutation_rate: float = 1 / 16,
        paths_per_step: int = 1,
        eval_bn: str = "batch",
        max_params_m: float | None = None,
        max_latency_ms: float | None = None,
        latency: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "cost_net"], logger=False)
        self.net, self.loss_fn = net, loss
        objectives = tuple(objectives)
        if not objectives or any(o not in OBJECTIVES for o in objectives):
            raise AutoclsError(f"model.objectives={list(objectives)} must name costs among {', '.join(OBJECTIVES)}.")
        if selection not in SELECTIONS:
            raise AutoclsError(f"model.selection={selection} is unknown; use one of {', '.join(SELECTIONS)}.")
        if population_size < 2 or paths_per_step < 1 or evolve_every < 1 or offspring_ratio <= 0:
            raise AutoclsError(
                "model.population_size must be >= 2, paths_per_step and evolve_every >= 1 and offspring_ratio > 0."
            )
        if eval_bn not in ("batch", "running"):
            raise AutoclsError(f"model.eval_bn={eval_bn} must be batch or running.")
        if net.multiplier != net.steps:
            raise AutoclsError(
                f"CARS searches cells that concatenate all {net.steps} nodes; set model.net.multiplier={net.steps}."
            )
        self.objectives = objectives
        self.space = DartsSpace(ops=tuple(p for p in net.primitives if p != "none"), steps=net.steps, mutation_rate=mutation_rate)
        self.constraints = Constraints(max_params_m, max_latency_ms)
        self.constraints.bounds()  # validates them now, not after the first epoch
        self.latency_cfg = {**LATENCY_DEFAULTS, **dict(latency or {})}
        self.cost_net = cost_net or partial(
            evaluation_network, C=net.C, layers=net.layers, num_classes=net.num_classes, in_chans=in_chans
        )
        self.val_acc_best = MaxMetric()

        # the search state (saved in checkpoints)
        self.rng = np.random.default_rng(seed)
        self.population: list[Genotype] = []
        self.member_acc: list[float] = []
        self.tables: dict[str, OpCostTable] = {}
        self.costs: GenotypeCosts | None = None
        self._cost_cache: dict[Genotype, dict[str, float]] = {}
        # per validation epoch
        self._candidates: list[Genotype] = []
        self._correct: torch.Tensor | None = None
        self._seen = 0
        self._timer: dict[str, float] = {}

    # --- costs, constraints, the initial population ----------------------------------------------
    @property
    def needs_latency(self) -> bool:
        return "latency_ms" in self.objectives or self.hparams.max_latency_ms is not None

    def network_description(self) -> dict:
        return describe_network(self.cost_net, self.hparams.image_size, self.hparams.in_chans, self.space.steps)

    def _ensure_ready(self) -> None:
        """Cost tables, constraint check and initial population, unless a checkpoint restored them."""
        # a generator of its own for the latency calibration: it must not change what the search draws
        calibration_rng = np.random.default_rng(self.hparams.seed + 1)
        self.costs = ensure_cost_tables(
            self.tables,
            self.cost_net,
            self.space.ops,
            self.space.reference(),
            self.hparams.image_size,
            self.hparams.in_chans,
            latency=self.latency_cfg if self.needs_latency else None,
            calibration=lambda n: [self.space.sample(calibration_rng) for _ in range(n)],
            save_dir=self.out_dir if self._is_writer() else None,
            who="CARS",
        )
        self.constraints.check_reachable(
            self.costs.lowest(self.space.ops, self.space.steps),
            fix="search a smaller network (model.cost_net.C / model.cost_net.layers)",
        )
        if not self.population:
            self.population = sample_population(self.space, self.hparams.population_size, self.rng, self.is_feasible)
            self.member_acc = []

    def member_costs(self, genotype: Genotype) -> dict[str, float]:
        if genotype not in self._cost_cache:
            self._cost_cache[genotype] = self.costs(genotype)
        return self._cost_cache[genotype]

    def is_feasible(self, genotype: Genotype) -> bool:
        return self.constraints.violation(self.member_costs(genotype)) == 0

    # --- training ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, genotype: Genotype) -> torch.Tensor:
        return self.net(x, genotype)

    def on_train_start(self) -> None:
        self._ensure_ready()

    def on_train_epoch_start(self) -> None:
        self._timer["train"] = time.perf_counter()

    def _training_path(self) -> Genotype:
        if self.current_epoch < self.hparams.warmup_epochs:
            return self.space.sample(self.rng)
        return self.population[int(self.rng.integers(len(self.population)))]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, target = batch
        k = self.hparams.paths_per_step
        loss = sum(self.loss_fn(self.net(images, self._training_path()), target) for _ in range(k)) / k
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    # --- evaluation and evolution ----------------------------------------------------------------
    def evolving(self, epoch: int) -> bool:
        """Whether the validation at the end of `epoch` selects a new population."""
        after_warmup = epoch + 1 - self.hparams.warmup_epochs
        return after_warmup >= 0 and after_warmup % self.hparams.evolve_every == 0

    def on_validation_start(self) -> None:
        self._ensure_ready()

    def on_validation_epoch_start(self) -> None:
        self._timer["eval"] = time.perf_counter()
        if self.trainer.sanity_checking:
            self._candidates = []
            return
        self._candidates = list(self.population)
        if self.evolving(self.current_epoch):
            n = max(1, round(self.hparams.offspring_ratio * len(self.population)))
            self._candidates += make_offspring(
                self.space,
                self.population,
                n,
                self.rng,
                self.is_feasible,
                self.hparams.mutation_prob,
                self.hparams.crossover_prob,
            )
        self._correct = torch.zeros(len(self._candidates), dtype=torch.long, device=self.device)
        self._seen = 0

    def validation_step(self, batch, batch_idx: int) -> None:
        if not self._candidates:
            return
        images, target = batch
        with self._evaluation_bn():
            for i, genotype in enumerate(self._candidates):
                self._correct[i] += (self.net(images, genotype).argmax(dim=1) == target).sum()
        self._seen += len(target)

    def _evaluation_bn(self):
        return batch_statistics(self.net) if self.hparams.eval_bn == "batch" else _nothing()

    def on_validation_epoch_end(self) -> None:
        if not self._candidates:
            return
        correct = self.trainer.strategy.reduce(self._correct.float(), reduce_op="sum")
        seen = self.trainer.strategy.reduce(torch.tensor(float(self._seen), device=self.device), reduce_op="sum")
        accuracy = (correct / seen.clamp(min=1)).cpu().numpy()
        candidates = self._candidates
        costs = [self.member_costs(g) for g in candidates]
        cost_matrix = np.array([[c[o] for o in self.objectives] for c in costs])
        n_parents = len(self.population)
        if len(candidates) > n_parents:
            violation = [self.constraints.violation(c) for c in costs]
            keep = select_survivors(
                accuracy, cost_matrix, self.hparams.population_size, self.hparams.selection, self.rng, violation
            )
        else:
            keep = np.arange(n_parents)
        self.population = [candidates[i] for i in keep]
        self.member_acc = [float(accuracy[i]) for i in keep]

        best = float(max(self.member_acc))
        self.val_acc_best.update(torch.tensor(best))
        front = pareto_front(self.member_acc, cost_matrix[keep])
        self.log("val/acc", best, prog_bar=True)
        self.log("val/acc_mean", float(np.mean(self.member_acc)))
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self.log("val/front_size", float(len(front)))
        self.log("search/evaluated", float(len(candidates)))
        if "train" in self._timer:
            self.log("search/train_s", self._timer["eval"] - self._timer["train"])
        self.log("search/eval_s", time.perf_counter() - self._timer["eval"])
        if self._is_writer():
            self._write_epoch(candidates, n_parents, accuracy, costs, set(keep.tolist()), keep[front])
        self._candidates = []

    def front_rows(self, indices: Sequence[int] | None = None) -> list[dict]:
        """The population's Pareto front (or the given members) as rows for files."""
        if indices is None:
            cost_matrix = np.array([[self.member_costs(g)[o] for o in self.objectives] for g in self.population])
            indices = pareto_front(self.member_acc, cost_matrix) if self.member_acc else range(len(self.population))
        rows = []
        for i in indices:
            g = self.population[i]
            row = {"member": g.to_string(), "val_acc": self.member_acc[i] if self.member_acc else None}
            row.update({k: round(v, 6) for k, v in self.member_costs(g).items()})
            rows.append(row)
        return rows

    def _write_epoch(self, candidates, n_parents: int, accuracy, costs, kept: set, front_idx) -> None:
        epoch = self.current_epoch
        rows, front, png = front_io.write_population(
            self.out_dir, epoch, candidates, accuracy, costs, self.objectives, kept, front_idx, n_parents, "offspring", f"CARS epoch {epoch}"
        )
        self._write_front_json(front, epoch)
        # W&B (when it logs the run): this epoch's candidates, its front and the front's plot
        log_rows(self.trainer, "search/population", [{"epoch": epoch, **r} for r in rows], self.global_step, images={"search/front_plot": png})
        log_rows(self.trainer, "search/front", [{"epoch": epoch, **r} for r in front], self.global_step)

    def _write_front_json(self, rows: list[dict], epoch: int) -> None:
        front_io.write_json(
            [{k: v for k, v in r.items() if k not in ("rank", "selected", "origin")} for r in rows],
            self.out_dir / "pareto_front.json",
            method="cars",
            epoch=epoch,
            objectives=["val_acc", *self.objectives],
            selection=self.hparams.selection,
            network=self.network_description(),
        )

    # --- testing: the front's members on the test set --------------------------------------------
    def on_test_start(self) -> None:
        self._ensure_ready()

    def on_test_epoch_start(self) -> None:
        rows = self.front_rows()
        self._test_rows = rows
        self._candidates = [self.space.from_string(r["member"]) for r in rows]
        self._correct = torch.zeros(len(self._candidates), dtype=torch.long, device=self.device)
        self._seen = 0

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        correct = self.trainer.strategy.reduce(self._correct.float(), reduce_op="sum")
        seen = self.trainer.strategy.reduce(torch.tensor(float(self._seen), device=self.device), reduce_op="sum")
        accuracy = (correct / seen.clamp(min=1)).cpu().numpy()
        rows = self._test_rows
        for row, acc in zip(rows, accuracy):
            row["test_acc"] = float(acc)
        best = max(range(len(rows)), key=lambda i: rows[i]["val_acc"] or 0.0)
        self.log("test/acc", float(accuracy[best]))
        self.log("test/acc_front_mean", float(np.mean(accuracy)))
        if self._is_writer():
            self._write_front_json(rows, self.current_epoch)
        self._candidates = []

    # --- checkpoints -----------------------------------------------------------------------------
    def population_state(self) -> dict[str, Any]:
        """Everything the search needs to continue exactly: members, their accuracies, the random
        generator and the cost tables (a re-measured latency table would differ)."""
        return {
            "population": [g.to_dict() for g in self.population],
            "member_acc": list(self.member_acc),
            "rng": rng_state(self.rng),
            "tables": {name: table.to_dict() for name, table in self.tables.items()},
        }

    def load_population_state(self, state: dict[str, Any]) -> None:
        self.population = [Genotype.from_dict(g) for g in state["population"]]
        self.member_acc = [float(a) for a in state["member_acc"]]
        self.rng = rng_from_state(state["rng"])
        self.tables = {name: OpCostTable.from_dict(t) for name, t in state["tables"].items()}
        self._cost_cache = {}
        self.costs = GenotypeCosts(self.tables["params"], self.tables.get("latency")) if "params" in self.tables else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.population_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.load_population_state(checkpoint[CHECKPOINT_KEY])

    # --- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        from src.optim.optimizers import global_batch_from
        from src.optim.schedulers import per_step_scheduler

        # only the weights: CARS never uses the supernet's architecture parameters
        optimizer = self.hparams.optimizer(self.net.weight_modules(), global_batch_size=global_batch_from(self.trainer))
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": per_step_scheduler(self.hparams.scheduler, optimizer, self.trainer)}

    # --- helpers ---------------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "cars"

    def _is_writer(self) -> bool:
        """Rank zero of a fit writes the files; a module used outside a trainer writes nothing."""
        return self._trainer is not None and self.trainer.is_global_zero


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norm layers of `module` normalise with the current batch's statistics and leave their
    running statistics untouched (train mode with momentum 0: running = 1 x running + 0 x batch)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum


@contextmanager
def _nothing() -> Iterator[None]:
    yield

