"""Search results as W&B tables: DARTS's genotype per epoch, the population and Pareto front of CARS
and BackboneNAS per epoch/generation, logged beside the files the searches write (the files stay the
record; W&B is for comparing runs on a dashboard).

Only W&B loggers get them: a run without `logger=wandb` logs nothing here, and a W&B run that is
offline (no account, `WANDB_MODE=offline`) stores the tables in its run folder for `wandb sync`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def table_data(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, data) of dict rows: every key that any row has, in first-seen order; a row without a
    key gets None there (e.g. `test_acc` before testing)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns, [[row.get(key) for key in columns] for row in rows]


def wandb_loggers(trainer) -> list:
    if trainer is None:
        return []
    from pytorch_lightning.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_rows(trainer, key: str, rows: Sequence[Mapping[str, Any]], step: int, images: Mapping[str, Path] | None = None) -> int:
    """Log `rows` as the table `key` (and each of `images`, key -> PNG) to every W&B logger of
    `trainer`; returns how many loggers got them."""
    loggers = wandb_loggers(trainer)
    if not rows:
        return 0
    columns, data = table_data(rows)
    for logger in loggers:
        logger.log_table(key=key, columns=columns, data=data, step=step)
        for image_key, path in (images or {}).items():
            logger.log_image(key=image_key, images=[str(path)], step=step)
    return len(loggers)
