"""BackboneNAS: evolutionary search over ResNet-style backbones (`src.nas.backbone_space`), each
candidate judged by a short training run, as one LightningModule.

Unlike CARS there is no shared supernet: every candidate is its own network, trained from scratch for
`steps_per_candidate` steps, and its validation accuracy after that is the (cheap, noisy) estimate
of how good the architecture is. One *generation* is therefore a set of networks trained side by
side, and the module owns them:

* a generation starts with `population_size` random encodings, later with offspring of the
  population (mutations, crossovers, fresh samples; `src.nas.evolution`);
* every training step trains *all* networks of the generation on the same batch (each with its own
  optimizer and schedule), so candidates differ only by architecture, never by the data they saw;
  once they have had `steps_per_candidate` steps, the epoch's remaining batches are skipped; a
  generation that needs more steps than one epoch has continues in the next epoch;
* the following validation evaluates each network of the generation, then NSGA-II/III or pNSGA-III
  (`src.nas.pareto`) keeps `population_size` of population + generation by (accuracy, parameters
  and/or latency measured on the target device) under the `max_params_m`/`max_latency_ms` bounds.

So `python train.py experiment=cifar_backbone_nas` runs the search with the usual trainer: an
epoch is (part of) a generation, `trainer.max_epochs` bounds the total, checkpoints hold the search
state (`checkpoint["backbone_nas"]`: population, accuracies, costs, random generator, the pending
generation's encodings, and the best network's weights) and a resumed search continues from it (a
generation interrupted mid-training is retrained from scratch). Manual optimisation, since the
optimizers come and go with the generations.

Outputs in `<run dir>/backbone_nas/`: per generation `population_GGG.csv`, `front_GGG.csv/png`, and
`pareto_front.json`. Train a result in full with `model/net=encoded_resnet model.net.encoding=<member>`.
Logged: `train/loss` (mean over the generation), `val/acc` (best member so far), `val/acc_mean`,
`val/acc_best`, `val/front_size`, `search/generation`, `search/evaluated` (networks of the
generation); `test/acc`: the best member's short-trained network on the test set. With
`logger=wandb` each generation's candidates and front are also W&B tables (`search/population`,
`search/front`) beside the front's plot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric

from src.nas import front as front_io
from src.nas.backbone_space import BackboneEncoding, BackboneSpace
from src.nas.evolution import (
    Constraints,
    make_offspring,
    rng_from_state,
    rng_state,
    sample_population,
)
from src.nas.pareto import SELECTIONS, pareto_front, select_survivors
from src.nas.wandb_tables import log_rows
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

OBJECTIVES = ("params_m", "latency_ms")
LATENCY_DEFAULTS = {"device": "cpu", "threads": 1, "warmup": 5, "repeats": 20}
CHECKPOINT_KEY = "backbone_nas"


class BackboneNasLitModule(pl.LightningModule):
    """See the module docstring.

    Args:
        net: The search space (`BackboneSpace`): the family of networks searched.
        loss: Training loss.
        optimizer, scheduler: Partials as for `ClassifierLitModule`; each candidate gets its own,
            the schedule spanning its `steps_per_candidate` steps.
        image_size: Input size (for latency measurement).
        population_size: Members kept after each selection; also the first generation's size.
        offspring_ratio: Size of later generations as a fraction of the population.
        steps_per_candidate: Training steps of every candidate (the short-training budget).
        selection: nsga2, nsga3 or pnsga3.
        objectives: Costs minimised beside maximising accuracy: params_m and/or latency_ms.
        mutation_prob, crossover_prob: Shares of mutants and crossovers in a generation (rest random).
        max_params_m, max_latency_ms: Hard bounds on the costs.
        latency: How latency is measured: `device` (cpu/cuda), `threads`, `warmup`, `repeats` (batch 1).
        seed: Seed of the search's random generator.
    """

    def __init__(
        self,
        net: BackboneSpace,
        loss: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        image_size: int = 32,
        population_size: int = 8,
        offspring_ratio: float = 1.0,
        steps_per_candidate: int = 100,
        selection: str = "nsga3",
        objectives: Sequence[str] = ("params_m",),
        mutation_prob: float = 0.5,
        crossover_prob: float = 0.25,
        max_params_m: float | None = None,
        max_latency_ms: float | None = None,
        latency: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss"], logger=False)
        self.automatic_optimization = False  # optimizers belong to the candidates of a generation
        if not isinstance(net, BackboneSpace):
            raise AutoclsError("BackboneNAS needs model/net=backbone_space (a BackboneSpace), not a network.")
        objectives = tuple(objectives)
        if not objectives or any(o not in OBJECTIVES for o in objectives):
            raise AutoclsError(f"model.objectives={list(objectives)} must name costs among {', '.join(OBJECTIVES)}.")
        if selection not in SELECTIONS:
            raise AutoclsError(f"model.selection={selection} is unknown; use one of {', '.join(SELECTIONS)}.")
        if population_size < 2 or steps_per_candidate < 1 or offspring_ratio <= 0:
            raise AutoclsError("model.population_size must be >= 2, steps_per_candidate >= 1 and offspring_ratio > 0.")
        self.space, self.loss_fn, self.objectives = net, loss, objectives
        self.constraints = Constraints(max_params_m, max_latency_ms)
        self.constraints.bounds()
        self.latency_cfg = {**LATENCY_DEFAULTS, **dict(latency or {})}
        self.val_acc_best = MaxMetric()

        # the search state (saved in checkpoints)
        self.rng = np.random.default_rng(seed)
        self.population: list[BackboneEncoding] = []
        self.member_acc: list[float] = []
        self.pending: list[BackboneEncoding] = []
        self.generation = 0
        self.best: dict | None = None  # {"member", "val_acc", "state_dict"}
        self.cost_cache: dict[BackboneEncoding, dict[str, float]] = {}
        # the generation being trained: plain lists, so the changing networks stay out of the
        # module's state_dict (their architectures differ from checkpoint to checkpoint)
        self._nets: list[nn.Module] = []
        self._optimizers: list = []
        self._schedulers: list = []
        self._steps_done = 0
        self._evaluating = False

    # --- costs ---------------------------------------------------------------------------------
    def member_costs(self, encoding: BackboneEncoding) -> dict[str, float]:
        if encoding not in self.cost_cache:
            with torch.device("meta"):
                params = sum(p.numel() for p in self.space.decode(encoding).parameters())
            costs = {"params_m": params / 1e6}
            if "latency_ms" in self.objectives or self.hparams.max_latency_ms is not None:
                costs["latency_ms"] = self._latency(encoding)
            self.cost_cache[encoding] = costs
        return self.cost_cache[encoding]

    def _latency(self, encoding: BackboneEncoding) -> float:
        from src.deploy.latency import measure_latency

        cfg = self.latency_cfg
        size = self.hparams.image_size
        example = torch.randn(1, self.space.in_chans, size, size)
        result = measure_latency(
            self.space.decode(encoding), example, threads=cfg["threads"], warmup=cfg["warmup"], repeats=cfg["repeats"], device=cfg["device"]
        )
        return result.median_ms

    def is_feasible(self, encoding: BackboneEncoding) -> bool:
        return self.constraints.violation(self.member_costs(encoding)) == 0

    def _ensure_ready(self) -> None:
        if self.population or self.pending:
            return
        lowest: dict[str, float] = {}
        for encoding in self.space.cheapest():
            for key, value in self.member_costs(encoding).items():
                lowest[key] = min(lowest.get(key, float("inf")), value)
        self.constraints.check_reachable(lowest, fix="widen the space (smaller model.net.depths / widths, more downsampling)")
        self.pending = sample_population(self.space, self.hparams.population_size, self.rng, self.is_feasible)

    # --- a generation's networks ---------------------------------------------------------------
    @property
    def steps_per_candidate(self) -> int:
        # fast_dev_run runs a single batch: a one-step generation, so the search is exercised end to end
        return 1 if self._trainer is not None and self.trainer.fast_dev_run else self.hparams.steps_per_candidate

    def _build_generation(self) -> None:
        from src.optim.optimizers import global_batch_from

        if not self.pending:
            n = max(1, round(self.hparams.offspring_ratio * len(self.population)))
            self.pending = make_offspring(
                self.space,
                self.population,
                n,
                self.rng,
                self.is_feasible,
                self.hparams.mutation_prob,
                self.hparams.crossover_prob,
            )
            if not self.pending:
                raise AutoclsError("BackboneNAS found no new feasible candidate; widen the search space or loosen the constraints.")
        # each network's initial weights come from its own seed: a candidate's estimate does not
        # depend on which others share its generation
        self._nets, self._optimizers, self._schedulers = [], [], []
        batch = global_batch_from(self.trainer)
        for encoding in self.pending:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._net_seed(encoding))
                net = self.space.decode(encoding).to(self.device)
            optimizer = self.hparams.optimizer(net, global_batch_size=batch)
            steps = self.steps_per_candidate
            scheduler = self.hparams.scheduler(optimizer=optimizer, total_steps=steps, steps_per_epoch=steps) if self.hparams.scheduler else None
            self._nets.append(net)
            self._optimizers.append(optimizer)
            self._schedulers.append(scheduler)
        # handed to the strategy so that their steps count as the trainer's (global_step drives
        # checkpointing and logging) and precision plugins wrap them
        self.trainer.strategy.optimizers = list(self._optimizers)
        self._steps_done = 0
        log.info(f"BackboneNAS generation {self.generation}: training {len(self._nets)} candidates for {self.steps_per_candidate} steps")

    def _net_seed(self, encoding: BackboneEncoding) -> int:
        return (self.hparams.seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(encoding.to_string()))) % 2**31

    # --- training ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._ensure_ready()

    def on_train_epoch_start(self) -> None:
        if not self._nets:
            self._build_generation()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        if self._steps_done >= self.steps_per_candidate:
            # the generation has had its budget; the rest of the epoch's batches pass untouched (ending
            # the epoch early with on_train_batch_start -> -1 would skip the validation that scores it)
            return None
        images, target = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        losses = []
        for net, optimizer, scheduler in zip(self._nets, optimizers, self._schedulers):
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(net(images), target)
            self.manual_backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
        self._steps_done += 1
        mean_loss = torch.stack(losses).mean()
        self.log("train/loss", mean_loss, on_step=True, on_epoch=False, prog_bar=True)
        return mean_loss

    # --- evaluation and selection --------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._ensure_ready()

    def on_validation_epoch_start(self) -> None:
        self._evaluating = bool(self._nets) and self._steps_done >= self.steps_per_candidate and not self.trainer.sanity_checking
        self._correct = torch.zeros(len(self._nets), dtype=torch.long, device=self.device)
        self._seen = 0

    def validation_step(self, batch, batch_idx: int) -> None:
        if not self._evaluating:
            return
        images, target = batch
        for i, net in enumerate(self._nets):
            net.eval()
            self._correct[i] += (net(images).argmax(dim=1) == target).sum()
        self._seen += len(target)

    def on_validation_epoch_end(self) -> None:
        if self._evaluating:
            self._select()
        if self.member_acc:
            best = float(max(self.member_acc))
            self.val_acc_best.update(torch.tensor(best))
            self.log("val/acc", best, prog_bar=True)
            self.log("val/acc_mean", float(np.mean(self.member_acc)))
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        else:  # the first generation is still training: nothing to report yet (monitors need a value)
            self.log("val/acc", 0.0)
        self.log("search/generation", float(self.generation))

    def _select(self) -> None:
        correct = self.trainer.strategy.reduce(self._correct.float(), reduce_op="sum")
        seen = self.trainer.strategy.reduce(torch.tensor(float(self._seen), device=self.device), reduce_op="sum")
        new_acc = (correct / seen.clamp(min=1)).cpu().numpy()
        candidates = self.population + self.pending
        accuracy = np.concatenate([np.asarray(self.member_acc, dtype=float), new_acc])
        costs = [self.member_costs(e) for e in candidates]
        cost_matrix = np.array([[c[o] for o in self.objectives] for c in costs])
        k = min(self.hparams.population_size, len(candidates))
        violation = [self.constraints.violation(c) for c in costs]
        keep = select_survivors(accuracy, cost_matrix, k, self.hparams.selection, self.rng, violation)

        # the best short-trained network so far is kept for testing (and in checkpoints)
        top = int(np.argmax(new_acc))
        if self.best is None or new_acc[top] > self.best["val_acc"]:
            state = {k: v.detach().cpu().clone() for k, v in self._nets[top].state_dict().items()}
            self.best = {"member": self.pending[top].to_string(), "val_acc": float(new_acc[top]), "state_dict": state}

        n_parents = len(self.population)
        self.population = [candidates[i] for i in keep]
        self.member_acc = [float(accuracy[i]) for i in keep]
        front = pareto_front(self.member_acc, cost_matrix[keep])
        self.log("val/front_size", float(len(front)))
        self.log("search/evaluated", float(len(new_acc)))
        if self.trainer.is_global_zero:
            self._write_generation(candidates, n_parents, accuracy, costs, set(keep.tolist()), keep[front])
        self.pending, self._nets, self._optimizers, self._schedulers = [], [], [], []
        self.trainer.strategy.optimizers = []
        self.generation += 1

    def _write_generation(self, candidates, n_parents, accuracy, costs, kept: set, front_idx) -> None:
        g, out = self.generation, self.out_dir
        rows, front, png = front_io.write_population(
            out, g, candidates, accuracy, costs, self.objectives, kept, front_idx, n_parents, "new", f"BackboneNAS generation {g}"
        )
        # W&B (when it logs the run): this generation's candidates, its front and the front's plot
        log_rows(self.trainer, "search/population", [{"generation": g, **r} for r in rows], self.global_step, images={"search/front_plot": png})
        log_rows(self.trainer, "search/front", [{"generation": g, **r} for r in front], self.global_step)
        front_io.write_json(
            [{k: v for k, v in r.items() if k not in ("rank", "selected", "origin")} for r in front],
            out / "pareto_front.json",
            method="backbone_nas",
            generation=g,
            objectives=["val_acc", *self.objectives],
            steps_per_candidate=self.steps_per_candidate,
            best=self.best["member"] if self.best else None,
        )

    # --- testing: the best member's network ------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        if self.best is None:
            raise AutoclsError(
                "BackboneNAS has not evaluated a generation yet, so there is no network to test; "
                "train for at least model.steps_per_candidate steps."
            )
        self._test_net = self.space.decode(self.best["member"])
        self._test_net.load_state_dict(self.best["state_dict"])
        self._test_net.to(self.device).eval()
        self._test_correct, self._test_seen = torch.zeros((), device=self.device), 0

    def test_step(self, batch, batch_idx: int) -> None:
        images, target = batch
        self._test_correct += (self._test_net(images).argmax(dim=1) == target).sum()
        self._test_seen += len(target)

    def on_test_epoch_end(self) -> None:
        correct = self.trainer.strategy.reduce(self._test_correct.float(), reduce_op="sum")
        seen = self.trainer.strategy.reduce(torch.tensor(float(self._test_seen), device=self.device), reduce_op="sum")
        self.log("test/acc", float(correct / seen.clamp(min=1)))

    # --- checkpoints -----------------------------------------------------------------------------
    def search_state(self) -> dict[str, Any]:
        return {
            "population": [e.to_string() for e in self.population],
            "member_acc": list(self.member_acc),
            "pending": [e.to_string() for e in self.pending],
            "generation": self.generation,
            "rng": rng_state(self.rng),
            "costs": {e.to_string(): c for e, c in self.cost_cache.items()},
            "best": self.best,
        }

    def load_search_state(self, state: dict[str, Any]) -> None:
        parse = BackboneEncoding.parse
        self.population = [parse(e) for e in state["population"]]
        self.member_acc = [float(a) for a in state["member_acc"]]
        self.pending = [parse(e) for e in state["pending"]]
        self.generation = int(state["generation"])
        self.rng = rng_from_state(state["rng"])
        self.cost_cache = {parse(e): dict(c) for e, c in state["costs"].items()}
        self.best = state["best"]
        self._nets, self._optimizers, self._schedulers = [], [], []  # an interrupted generation restarts

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.search_state()
        # the candidates' optimizers die with their generation (a resumed one restarts): not saved
        checkpoint["optimizer_states"], checkpoint["lr_schedulers"] = [], []

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.load_search_state(checkpoint[CHECKPOINT_KEY])

    def configure_optimizers(self) -> None:
        return None  # each candidate's optimizer is built with its generation (_build_generation)

    @property
    def out_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "backbone_nas"
