"""Learning-rate schedules stepped every optimizer step (not every epoch), so warmup and decay are
smooth whatever the dataset size.

Every schedule is a `WarmupLR`: one shared linear warmup, then the schedule's own `decay(step)`, a
factor of each parameter group's base lr (so per-group multipliers such as `lr_mult_list` or
`layer_decay` keep their ratios). They are `LambdaLR`s, so their state (step counter and settings)
round-trips through `state_dict` and a resumed run continues on the same curve.

They are built by `ClassifierLitModule.configure_optimizers` with the run's `total_steps` and
`steps_per_epoch`; configs give only the shape (`_partial_: true`), with times in epochs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from src.utils.errors import AutoclsError


def _half_cosine(progress: float) -> float:
    """1 at progress 0, falling along half a cosine period to 0 at progress 1."""
    return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupLR(LambdaLR):
    """Linear warmup over `warmup_epochs`, then `decay(step)` (subclasses define it).

    Warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD", gradual warmup) rises linearly from
    `warmup_start` x the base lr to the value the schedule has when warmup ends, so the curve is
    continuous. Its first step is already 1/(warmup_steps+1) of the way up, because a step at lr 0
    would be wasted. It is capped at `total_steps - 1` steps, so every schedule is defined for any
    run length.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        warmup_start: float = 0.0,
    ) -> None:
        self.total_steps = max(1, int(total_steps))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.warmup_steps = min(round(warmup_epochs * self.steps_per_epoch), self.total_steps - 1)
        self.warmup_start = warmup_start
        # LambdaLR evaluates factor(0) here, so subclasses set their own attributes before this call.
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The multiplier of the base lr for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            target = self.decay(self.warmup_steps)
            return self.warmup_start + (target - self.warmup_start) * (step + 1) / (self.warmup_steps + 1)
        return self.decay(step)

    def decay(self, step: int) -> float:
        """The schedule after warmup; `step` counts from the start of the run."""
        raise NotImplementedError

    def progress(self, step: int) -> float:
        """Fraction of the post-warmup steps done: 0 when warmup ends, 1 after the last step."""
        return min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))

    def epochs_after_warmup(self, step: int) -> float:
        """Epochs (fractional) since warmup ended."""
        return (step - self.warmup_steps) / self.steps_per_epoch


class WarmupCosineLR(WarmupLR):
    """Cosine decay that reaches `min_lr_ratio` x the base rate after the last step (Loshchilov & Hutter
    2017, "SGDR", a single cycle without restarts)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, total_steps, steps_per_epoch, warmup_epochs)

    def decay(self, step: int) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * _half_cosine(self.progress(step))


class WarmupPiecewiseLR(WarmupLR):
    """Step decay: constant pieces that change at `milestones` (epochs from the start of the run), as in
    He et al. 2016 ("Deep Residual Learning", lr / 10 at fixed epochs) and Goyal et al. 2017.

    Piece i (after i milestones) uses `values[i]` x the base lr, or `gamma ** i` without `values`.
    PaddleClas's `Piecewise` gives absolute rates; divide them by `optimizer.lr` to get `values`.
    The first step of epoch m already uses the piece after milestone m.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        milestones: Sequence[float],
        gamma: float = 0.1,
        values: Sequence[float] | None = None,
        warmup_epochs: float = 0.0,
    ) -> None:
        self.milestones = sorted(float(m) for m in milestones)
        if values is None:
            self.values = [gamma**i for i in range(len(self.milestones) + 1)]
        elif len(values) == len(self.milestones) + 1:
            self.values = [float(v) for v in values]
        else:
            raise AutoclsError(
                f"scheduler.values has {len(values)} entries but {len(self.milestones)} milestones need "
                f"{len(self.milestones) + 1} (one lr factor before the first milestone and one after each)."
            )
        super().__init__(optimizer, total_steps, steps_per_epoch, warmup_epochs)

    def decay(self, step: int) -> float:
        passed = sum(step >= round(m * self.steps_per_epoch) for m in self.milestones)
        return self.values[passed]


class WarmupPolyLR(WarmupLR):
    """Polynomial decay, `min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** power`, reaching
    `min_lr_ratio` after the last step (the "poly" policy of Liu et al. 2015, ParseNet, and Chen et al.
    2017, DeepLab, with power 0.9).

    `power=1, min_lr_ratio=0` is the linear decay to zero of Li, Yumer & Ramanan 2020 ("Budgeted
    Training"), which they find best when the number of steps is fixed in advance
    (`scheduler=linear_to_zero`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        power: float = 1.0,
        min_lr_ratio: float = 0.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        self.power, self.min_lr_ratio = power, min_lr_ratio
        super().__init__(optimizer, total_steps, steps_per_epoch, warmup_epochs)

    def decay(self, step: int) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - self.progress(step)) ** self.power


class WarmupExponentialLR(WarmupLR):
    """Exponential decay by `gamma` per epoch after warmup, applied smoothly every step
    (`gamma ** epochs_since_warmup`). EfficientNet's "0.97 every 2.4 epochs" (Tan & Le 2019) is
    `gamma = 0.97 ** (1 / 2.4)`."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        gamma: float = 0.97,
        warmup_epochs: float = 0.0,
    ) -> None:
        self.gamma = gamma
        super().__init__(optimizer, total_steps, steps_per_epoch, warmup_epochs)

    def decay(self, step: int) -> float:
        return self.gamma ** self.epochs_after_warmup(step)


class WarmupCyclicLR(WarmupLR):
    """Cycles of `cycle_epochs` after warmup between `min_lr_ratio` and 1 x the base lr.

    * `mode="cosine"`: cosine annealing with warm restarts (Loshchilov & Hutter 2017, "SGDR"): each
      cycle starts at the base lr and falls along a half cosine towards the minimum.
    * `mode="triangular"`: Smith 2017 ("Cyclical Learning Rates"): each cycle starts at the minimum,
      rises linearly to the base lr at mid-cycle and falls back. It starts low, so warmup (which
      rises to the cycle's start) is usually left at 0.

    In both modes the lr is lowest at cycle ends, where SWA (Izmailov et al. 2018) takes its
    snapshots: average the weights after each `cycle_epochs`.
    """

    MODES = ("cosine", "triangular")

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        cycle_epochs: float,
        mode: str = "cosine",
        min_lr_ratio: float = 0.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        if mode not in self.MODES:
            raise AutoclsError(f"Unknown scheduler.mode '{mode}'; choose one of {', '.join(self.MODES)}.")
        if cycle_epochs <= 0:
            raise AutoclsError(
                f"scheduler.cycle_epochs must be positive (got {cycle_epochs}); set the cycle length in epochs."
            )
        self.cycle_epochs, self.mode, self.min_lr_ratio = float(cycle_epochs), mode, min_lr_ratio
        super().__init__(optimizer, total_steps, steps_per_epoch, warmup_epochs)

    @property
    def cycle_steps(self) -> int:
        return max(1, round(self.cycle_epochs * self.steps_per_epoch))

    def decay(self, step: int) -> float:
        position = ((step - self.warmup_steps) % self.cycle_steps) / self.cycle_steps  # 0 at a cycle's start
        if self.mode == "cosine":
            shape = _half_cosine(position)
        else:
            shape = 1 - abs(2 * position - 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


class WarmupOneCycleLR(WarmupLR):
    """The 1cycle policy (Smith & Topin 2019, "Super-Convergence"), shaped like torch's `OneCycleLR`
    (two phases): the warmup rises linearly from base/`div_factor` to the base lr over the first
    `pct_start` of the run, then the lr anneals (`"cos"` or `"linear"`) to
    base/(`div_factor` x `final_div_factor`) after the last step.

    Unlike torch's class it changes only the lr (no momentum cycling), steps past the end stay at the
    final lr instead of raising, and per-group lr ratios are kept.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        anneal_strategy: str = "cos",
    ) -> None:
        if anneal_strategy not in ("cos", "linear"):
            raise AutoclsError(
                f"Unknown scheduler.anneal_strategy '{anneal_strategy}'; choose cos or linear."
            )
        if not 0 <= pct_start < 1:
            raise AutoclsError(
                f"scheduler.pct_start must be in [0, 1) (got {pct_start}); it is the warmup's share of the run."
            )
        self.anneal_strategy = anneal_strategy
        self.min_lr_ratio = 1 / (div_factor * final_div_factor)
        steps_per_epoch = max(1, int(steps_per_epoch))
        super().__init__(
            optimizer, total_steps, steps_per_epoch,
            warmup_epochs=pct_start * total_steps / steps_per_epoch, warmup_start=1 / div_factor,
        )

    def decay(self, step: int) -> float:
        progress = self.progress(step)
        shape = _half_cosine(progress) if self.anneal_strategy == "cos" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def lr_curve(optimizer: Optimizer, scheduler: LRScheduler | None, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps would use (first parameter group), stepping `scheduler`
    after every step as Lightning does (None: constant lr). For plots: no weights are updated."""
    lrs = []
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer ever did; here that is the point
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step()
    return lrs


def per_step_scheduler(scheduler: Callable, optimizer, trainer) -> dict:
    """A scheduler partial of the `scheduler` config group built for this run's step counts, as
    Lightning's per-step `lr_scheduler` entry (what every LightningModule here returns)."""
    total_steps = trainer.estimated_stepping_batches
    if not math.isfinite(total_steps):
        raise AutoclsError(
            "The run has no end (trainer.max_epochs=-1 and no trainer.max_steps), so the lr schedule has no "
            "length; set trainer.max_epochs or trainer.max_steps to a positive number."
        )
    epochs = max(1, trainer.max_epochs or 1)
    built = scheduler(optimizer=optimizer, total_steps=total_steps, steps_per_epoch=max(1, total_steps // epochs))
    return {"scheduler": built, "interval": "step"}
