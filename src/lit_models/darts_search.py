"""DARTS (Liu et al. 2019) and PC-DARTS (Xu et al. 2020) architecture search as a LightningModule.

Every training step takes one batch from each half of the train split (`data.search_split`: the data
module yields `{"weights": (x, y), "arch": (x, y)}`) and makes two updates, in the order of the
DARTS code:
1. architecture: the gradient of the loss on the *arch* batch with respect to the architecture
   parameters (first order, or second order through one unrolled weight step, `second_order`),
   applied by Adam (`arch_optimizer`), from epoch `arch_start_epoch` on (PC-DARTS warms the weights
   up for 15 epochs first);
2. weights: SGD (`optimizer`, with `scheduler` stepped per step) on the *weights* batch, with the
   gradient norm clipped to `grad_clip`.
Both optimisers are updated by hand (`automatic_optimization = False`).

After every training epoch the genotype of the current architecture parameters is derived and
written into the run directory (`genotypes/epoch_NNN.json` and `genotype.json`, the latest, ready for
`model.net.genotype=<run dir>/genotype.json`), with a heatmap of the mixture weights
(`genotypes/alphas_epoch_NNN.png`, `alphas.png`), and added to a W&B table when W&B logs the run.
`val/acc` is the supernet's (mixture) accuracy on the validation split, so checkpointing works as in
any run.

Hardware bounds: with `max_params_m` / `max_latency_ms` the derivation returns the genotype of most
mixture weight whose network (`cost_net`, by default the paper's 20-cell, 36-channel CIFAR network)
meets them (`src.nas.derive.derive_within_bounds`), with the same cost model as CARS: exact
parameters and a per-op latency lookup table measured on the target device (`latency`,
`src.nas.latency_table`). The costs of each epoch's genotype are logged (`search/params_m`,
`search/latency_ms`); a bound that no genotype of the space can meet stops the run at its start in
one sentence.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from src.nas.architect import first_order_arch_grads, unrolled_arch_grads
from src.nas.derive import derive_within_bounds
from src.nas.evolution import Constraints, DartsSpace
from src.nas.genotypes import Genotype
from src.nas.latency_table import (
    LATENCY_DEFAULTS,
    GenotypeCosts,
    OpCostTable,
    ensure_cost_tables,
    evaluation_network,
)
from src.nas.plots import plot_alphas
from src.nas.wandb_tables import log_rows
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

BATCH_KEYS = ("weights", "arch")
FIX = "search a smaller network (model.cost_net.C / model.cost_net.layers)"


class DartsSearchLitModule(pl.LightningModule):
    """Searches `net` (a `src.nas.supernet.DartsSupernet`); see the module docstring.

    Args:
        net: The supernet, with `arch_parameters()`, `weight_modules()` and `genotype()`.
        loss: The classification loss (hard or soft targets).
        optimizer: Partial of `src.optim.optimizers.build_optimizer` for the weights (DARTS: SGD 0.025,
            momentum 0.9, weight decay 3e-4).
        arch_optimizer: Partial taking the architecture parameters (`src.nas.architect.arch_optimizer`).
        scheduler: Partial of a per-step schedule for the weight optimizer (DARTS: cosine to 0.001).
        second_order: Use the unrolled (second-order) architecture gradient.
        arch_start_epoch: First epoch with architecture updates (0 in DARTS, 15 in PC-DARTS).
        grad_clip: Max gradient norm of the weight step (5 in DARTS); null for none.
        cost_net: Partial of the network a genotype becomes (`NetworkCIFAR` without its genotype):
            its parameters (and latency) are the costs logged and bounded. None: no costs, unless a
            bound is set, then a `NetworkCIFAR` of the supernet's C and layers.
        image_size, in_chans: Input shape for the cost tables (from the data).
        max_params_m, max_latency_ms: Hard bounds on the derived genotype's costs (None: unbounded).
        latency: The latency lookup table, as for CARS: `table` (a JSON file; null: measure one into
            the run dir), `device`, `threads`, `warmup`, `repeats`, `calibration`.
        seed: Seed of the random genotypes that calibrate a measured latency table.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        arch_optimizer: partial,
        scheduler: partial | None = None,
        second_order: bool = False,
        arch_start_epoch: int = 0,
        grad_clip: float | None = 5.0,
        cost_net: partial | None = None,
        image_size: int = 32,
        in_chans: int = 3,
        max_params_m: float | None = None,
        max_latency_ms: float | None = None,
        latency: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["net", "loss", "cost_net"], logger=False)
        self.net, self.loss_fn = net, loss
        self.constraints = Constraints(max_params_m, max_latency_ms)
        bounded = self.constraints.bounds()  # validates them now, not after the first epoch
        if bounded and cost_net is None:
            cost_net = partial(evaluation_network, C=net.C, layers=net.layers, num_classes=net.num_classes, in_chans=in_chans)
        self.cost_net = cost_net
        self.latency_cfg = {**LATENCY_DEFAULTS, **dict(latency or {})}
        self.tables: dict[str, OpCostTable] = {}  # the cost tables (kept in checkpoints)
        self.costs: GenotypeCosts | None = None
        num_classes = net.num_classes
        for stage in ("train", "val", "test"):
            metrics = {
                "loss": MeanMetric(),
                "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))
        self.arch_loss = MeanMetric()
        self.val_acc_best = MaxMetric()
        self.history: list[tuple[int, str]] = []  # (epoch, genotype string): the W&B table, kept in checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if "16" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            # the architecture gradients are taken with torch.autograd.grad, outside the fp16 loss scaler
            raise AutoclsError("DARTS search does not support trainer.precision=16-mixed; use 32-true or bf16-mixed.")
        if self.trainer.world_size > 1:
            raise AutoclsError(
                "DARTS search runs on one device (its architecture gradients are not synchronised across "
                "processes); set trainer.devices=1."
            )

    # --- training ------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x_w, y_w), (x_a, y_a) = self._search_batches(batch)
        weight_opt, arch_opt = self.optimizers()

        if self.current_epoch >= self.hparams.arch_start_epoch:
            arch_opt.zero_grad()
            if self.hparams.second_order:
                arch_loss = unrolled_arch_grads(self.net, self.loss_fn, (x_w, y_w), (x_a, y_a), weight_opt.optimizer)
            else:
                arch_loss = first_order_arch_grads(self.net, self.loss_fn, x_a, y_a)
            arch_opt.step()
            self.arch_loss.update(arch_loss, weight=len(y_a))
            self.log("train/arch_loss", self.arch_loss, on_step=False, on_epoch=True)

        weight_opt.zero_grad()
        logits = self.net(x_w)
        loss = self.loss_fn(logits, y_w)
        # gradients for the weights only: the architecture parameters keep what the arch step left
        self.manual_backward(loss, inputs=self.net.weight_parameters())
        if self.hparams.grad_clip:
            self.clip_gradients(weight_opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        weight_opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        self._update_metrics("train", logits, y_w, loss)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", weight_opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss.detach()

    def _search_batches(self, batch: Any) -> tuple:
        if not isinstance(batch, dict) or set(batch) != set(BATCH_KEYS):
            raise AutoclsError(
                "DARTS search needs train batches from two halves of the train split; set data.search_split=0.5 "
                "(the experiments cifar_darts, cifar_pcdarts and digits_darts do)."
            )
        return tuple(batch[key] for key in BATCH_KEYS)

    # The genotype is recorded after the epoch's last training batch, before the validation that
    # writes the epoch's checkpoint (Lightning runs on_train_epoch_end after it), so a checkpoint
    # always holds its own epoch's genotype; a run stopped mid-epoch (max_steps) records it at the end.
    def on_train_epoch_start(self) -> None:
        self._epoch_recorded = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= self.trainer.num_training_batches:
            genotype = self._record_genotype()
            # many skip connections in the normal cell is DARTS's known failure mode (Zela et al. 2020)
            skips = sum(op == "skip_connect" for op, _ in genotype.normal)
            self.log("search/normal_skip_connects", float(skips), on_step=False, on_epoch=True)
            for key, value in (self.costs(genotype) if self.costs is not None else {}).items():
                self.log(f"search/{key}", value, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        if not getattr(self, "_epoch_recorded", True) and self.global_step > 0:
            self._record_genotype()

    def _record_genotype(self) -> Genotype:
        self._epoch_recorded = True
        genotype = self.derive()
        epoch = self.current_epoch
        self.history.append((epoch, genotype.to_string()))
        costs = self.costs(genotype) if self.costs is not None else {}
        if self.trainer.is_global_zero:
            described = "".join(f", {value:.4g} {key}" for key, value in costs.items())
            log.info(f"Epoch {epoch} genotype{described}: {genotype}")
            self._write_genotype(genotype, epoch)
        return genotype

    # --- costs and bounds ----------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.ensure_costs()

    def cost_space(self) -> DartsSpace:
        """The genotypes this supernet derives (every primitive but 'none'), for the cost tables."""
        return DartsSpace(ops=tuple(p for p in self.net.primitives if p != "none"), steps=self.net.steps)

    def _with_net_concat(self, genotype: Genotype) -> Genotype:
        # the supernet's cells concatenate their last `multiplier` nodes, and so do derived genotypes
        concat = range(2 + self.net.steps - self.net.multiplier, self.net.steps + 2)
        return Genotype(genotype.normal, concat, genotype.reduce, concat)

    def ensure_costs(self) -> None:
        """The cost tables of `cost_net` (unless a checkpoint restored them), and one sentence when a
        bound is out of reach of every genotype, before any training is spent."""
        if self.cost_net is None:
            return
        space = self.cost_space()
        # a generator of its own: calibrating a latency table draws random genotypes
        calibration_rng = np.random.default_rng(self.hparams.seed + 1)
        needs_latency = self.hparams.max_latency_ms is not None or bool(self.hparams.latency and self.hparams.latency.get("table"))
        self.costs = ensure_cost_tables(
            self.tables,
            self.cost_net,
            space.ops,
            self._with_net_concat(space.reference()),
            self.hparams.image_size,
            self.hparams.in_chans,
            latency=self.latency_cfg if needs_latency else None,
            calibration=lambda n: [self._with_net_concat(space.sample(calibration_rng)) for _ in range(n)],
            save_dir=Path(self.trainer.default_root_dir) if self._trainer is not None and self.trainer.is_global_zero else None,
            who="DARTS",
        )
        self.constraints.check_reachable(self.costs.lowest(space.ops, space.steps), fix=FIX)

    def derive(self) -> Genotype:
        """The genotype of the current architecture parameters: DARTS's derivation, within the bounds
        when there are any."""
        if not self.constraints.bounds():
            return self.net.genotype()
        if self.costs is None:
            self.ensure_costs()
        net = self.net
        return derive_within_bounds(
            net.alphas_normal, net.alphas_reduce, self.costs, self.constraints, net.steps, net.primitives,
            net.betas_normal, net.betas_reduce, net.multiplier, fix=FIX,
        )

    def _write_genotype(self, genotype: Genotype, epoch: int) -> None:
        run_dir = Path(self.trainer.default_root_dir)
        folder = run_dir / "genotypes"
        folder.mkdir(parents=True, exist_ok=True)
        text = genotype.to_json(indent=1)
        (folder / f"epoch_{epoch:03d}.json").write_text(text)
        (run_dir / "genotype.json").write_text(text)
        net = self.net
        png = plot_alphas(
            {"normal": net.alphas_normal, "reduce": net.alphas_reduce},
            folder / f"alphas_epoch_{epoch:03d}.png",
            net.primitives,
            net.steps,
            betas={"normal": net.betas_normal, "reduce": net.betas_reduce},
            title=f"DARTS mixture weights after epoch {epoch}",
        )
        (run_dir / "alphas.png").write_bytes(png.read_bytes())
        self._log_to_wandb(png)

    def history_rows(self) -> list[dict]:
        """The genotype of every epoch so far, with its costs when there is a cost model (the W&B table)."""
        rows = []
        for epoch, text in self.history:
            costs = self.costs(Genotype.parse_string(text)) if self.costs is not None else {}
            rows.append({"epoch": epoch, "genotype": text, **{k: round(v, 6) for k, v in costs.items()}})
        return rows

    def _log_to_wandb(self, png: Path) -> None:
        log_rows(self.trainer, "search/genotypes", self.history_rows(), self.global_step, images={"search/alphas": png})

    # --- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, target = batch
        logits = self.net(images)
        self._update_metrics("val", logits, target, self.loss_fn(logits, target))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, target = batch
        logits = self.net(images)
        self._update_metrics("test", logits, target, self.loss_fn(logits, target))

    def _update_metrics(self, stage: str, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        labels = target.argmax(dim=1) if target.is_floating_point() else target
        metrics = getattr(self, f"{stage}_metrics")
        for name in ("acc", "acc_top5"):
            metrics[name].update(logits.detach(), labels)
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name == "acc")
        metrics["loss"].update(loss.detach(), weight=len(labels))
        key = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
        self.log(key, metrics["loss"], on_step=False, on_epoch=True)

    # --- optimisers and state ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from src.optim.optimizers import global_batch_from
        from src.optim.schedulers import per_step_scheduler

        # the weight optimizer sees the submodules only, never the architecture parameters
        weight_opt = self.hparams.optimizer(self.net.weight_modules(), global_batch_size=global_batch_from(self.trainer))
        arch_opt = self.hparams.arch_optimizer(self.net.arch_parameters())
        if self.hparams.scheduler is None:
            return [weight_opt, arch_opt]
        return [weight_opt, arch_opt], [per_step_scheduler(self.hparams.scheduler, weight_opt, self.trainer)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["darts_genotype_history"] = list(self.history)
        # a re-measured latency table would differ: a resumed search keeps deriving with this one
        checkpoint["darts_cost_tables"] = {name: table.to_dict() for name, table in self.tables.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = [tuple(row) for row in checkpoint.get("darts_genotype_history", [])]
        self.tables = {name: OpCostTable.from_dict(t) for name, t in checkpoint.get("darts_cost_tables", {}).items()}
        self.costs = None
