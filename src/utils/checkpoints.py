"""Reading our checkpoints and checking that they fit the model and data at hand."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.callbacks.run_metadata import CHECKPOINT_KEY
from src.utils.errors import AutoclsError


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (on CPU), or a one-sentence error for a file that is not one."""
    try:
        # our checkpoints hold configs and loop state besides tensors, hence weights_only=False:
        # only load checkpoints you trust, as with any pickle
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated file, not a checkpoint at all, ...
        raise AutoclsError(f"Could not read checkpoint {path} ({type(err).__name__}); pass a .ckpt written by train.py.") from err


def checkpoint_metadata(ckpt: dict, path: str | Path) -> dict:
    meta = ckpt.get(CHECKPOINT_KEY)
    if meta is None:
        raise AutoclsError(f"{path} has no autocls metadata (not written by train.py); pass a checkpoint from a train.py run.")
    return meta


def check_compatible(ckpt: dict, model: nn.Module, path: str | Path, num_classes: int) -> None:
    """One clear sentence instead of PyTorch's size-mismatch dump when a checkpoint does not fit."""
    meta = ckpt.get(CHECKPOINT_KEY) or {}
    trained = (meta.get("data") or {}).get("num_classes")
    if trained is not None and trained != num_classes:
        raise AutoclsError(
            f"Checkpoint {path} was trained for {trained} classes but the data has {num_classes}; "
            f"use data with the same {trained} classes, or start a new run (fine-tune) instead of resuming."
        )
    own = model.state_dict()
    for key, value in ckpt.get("state_dict", {}).items():
        if key in own and own[key].shape != value.shape:
            raise AutoclsError(
                f"Checkpoint {path} does not fit this model: {key} has shape {tuple(value.shape)} there and "
                f"{tuple(own[key].shape)} here; use the model config the checkpoint was trained with."
            )
