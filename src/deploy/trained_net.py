"""Rebuild the plain network of a `train.py` checkpoint, without its LightningModule or data.

Export, prediction and serving need only the `nn.Module` plus what the checkpoint says about the
data (class names, image size, normalisation); they must not need the training data, the teacher of a
distillation run, or the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from src.utils.checkpoints import checkpoint_metadata, load_checkpoint
from src.utils.errors import AutoclsError

# prefixes a LightningModule (and torch.compile) put in front of the network's own parameter names
_NET_PREFIX = "net."
_COMPILED_PREFIX = "_orig_mod."


@dataclass
class TrainedNet:
    net: nn.Module  # on CPU, eval mode
    data: dict  # ClassificationDataModule.describe(): num_classes, class_names, image_size, mean, std, in_chans
    config: dict  # the resolved config of the training run
    path: str

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.data["in_chans"]), int(self.data["image_size"]), int(self.data["image_size"]))


def load_trained_net(ckpt_path: str | Path) -> TrainedNet:
    """The network of a checkpoint written by train.py, weights loaded, in eval mode on CPU."""
    ckpt = load_checkpoint(ckpt_path)
    meta = checkpoint_metadata(ckpt, ckpt_path)
    config, data = meta.get("config") or {}, meta.get("data")
    net_cfg = (config.get("model") or {}).get("net")
    if net_cfg is None or data is None:
        raise AutoclsError(
            f"{ckpt_path} does not record its network config or data description; re-save it with a current train.py run."
        )
    net_cfg = OmegaConf.create(net_cfg)
    if "pretrained" in net_cfg:
        net_cfg.pretrained = False  # the checkpoint has the weights; never download them again
    if "pretrained_file" in net_cfg:
        net_cfg.pretrained_file = None
    net = instantiate(net_cfg)
    state = net_state_dict(ckpt.get("state_dict", {}))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AutoclsError(
            f"{ckpt_path} does not fit the network its config describes ({len(missing)} missing, "
            f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[0]}); pass a checkpoint from train.py."
        )
    return TrainedNet(net=net.eval(), data=dict(data), config=config, path=str(ckpt_path))


def net_state_dict(state_dict: dict) -> dict:
    """The network's own weights from a LightningModule state dict (`net.` and torch.compile's
    `_orig_mod.` prefixes removed; other modules' weights, e.g. a distillation teacher's, dropped)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(_NET_PREFIX):
            continue
        key = key[len(_NET_PREFIX) :]
        key = key.removeprefix(_COMPILED_PREFIX)
        out[key] = value
    return out
