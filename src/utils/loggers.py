"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os


def wandb_logger(offline: bool | None = None, **kwargs):
    """A `WandbLogger` that runs offline unless the user is logged in (`wandb login` or
    WANDB_API_KEY), so runs never hang on a login prompt; `wandb sync <dir>` uploads them later."""
    from pytorch_lightning.loggers import WandbLogger

    if offline is None:
        offline = not _wandb_logged_in()
    return WandbLogger(offline=offline, **kwargs)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return True
    try:
        import netrc

        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def finish_loggers(loggers) -> None:
    """End the runs of `loggers` once a task is done. W&B keeps one active run per process, and a new
    `WandbLogger` attaches to it instead of starting its own: without this, every trial of an in-process
    Hydra multirun would write into the first trial's W&B run."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers or []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # only a run it started
            logger.experiment.finish()
