"""Lookahead with a growing average, as airbench trains (Jordan 2024; Lookahead: Zhang et al. 2019).

Every `every_n_steps` optimizer steps the network's weights w are averaged into a slow copy s and
then replaced by it:

    s <- d_t * s + (1 - d_t) * w,   w <- s,   d_t = decay^every_n_steps * (t / T)^power

at optimizer step t of T. Early on d_t is ~0 and the fast weights run free; towards the end the
slow copy damps the noise of the last steps, as an EMA does, but the network trains on from the
average (lookahead) instead of keeping two models. After the last step w <- s, so validation,
checkpoints and everything after training see the averaged weights. BatchNorm's running statistics
are averaged with the weights; integer buffers are left alone.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from src.utils.errors import AutoclsError


class Lookahead(pl.Callback):
    """See the module docstring. The slow copy is saved in checkpoints, so a resumed run continues it."""

    def __init__(self, decay: float = 0.95, every_n_steps: int = 5, power: float = 3.0) -> None:
        if not 0 <= decay <= 1 or every_n_steps < 1 or power < 0:
            raise AutoclsError(
                f"callbacks.lookahead needs decay in [0, 1], every_n_steps >= 1 and power >= 0 "
                f"(got {decay}, {every_n_steps}, {power}); airbench uses 0.95, 5 and 3."
            )
        self.decay, self.every_n_steps, self.power = float(decay), int(every_n_steps), float(power)
        self.slow: dict[str, torch.Tensor] | None = None
        self._last_step = -1  # batches that accumulate gradients end without an optimizer step

    def decay_at(self, step: int, total_steps: int) -> float:
        """d_t for optimizer step `step` (1-based, after it) of `total_steps`."""
        return self.decay**self.every_n_steps * min(1.0, step / total_steps) ** self.power

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        net = getattr(pl_module, "net", None)
        net = getattr(net, "_orig_mod", net)
        if net is None:
            raise AutoclsError(f"callbacks.lookahead averages the LightningModule's `net`, which {type(pl_module).__name__} has not.")
        return {k: v for k, v in net.state_dict(keep_vars=True).items() if v.is_floating_point()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = self._weights(pl_module)
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in weights.items()}
        else:  # restored from a checkpoint: onto the network's device
            self.slow = {k: self.slow[k].to(v.device, v.dtype) for k, v in weights.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, max(1, trainer.estimated_stepping_batches)
        update, last = step % self.every_n_steps == 0, step >= total
        if step == self._last_step or not (update or last):
            return
        self._last_step = step
        decay = self.decay_at(step, total) if update else 1.0
        for name, weight in self._weights(pl_module).items():
            slow = self.slow[name]
            slow.lerp_(weight.detach(), 1 - decay)
            weight.data.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = state_dict["slow"]
