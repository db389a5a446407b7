"""Save `last.ckpt` when a run is stopped by Ctrl-C or SIGTERM (cluster pre-emption, `kill`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(pl.Callback):
    """On KeyboardInterrupt or SIGTERM during fit, write `<dirpath>/last.ckpt` so that
    `ckpt_path=last` continues the run. Lightning turns SIGTERM into `SIGTERMException` after the
    running step finishes, so the weights, optimizer and loop counters saved here are consistent.
    Other exceptions (a crash, a NaN loss) save nothing: the weights may be the reason for the error.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.saved_path: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        self.saved_path = self.path
        log.warning(f"Interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {self.path}")
