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
