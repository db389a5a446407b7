"""A network from its config in configs/model/net/ (for benchmarks of untrained architectures)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from src.utils.errors import AutoclsError

NET_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "net"


def build_net(name: str, overrides: Sequence[str] = (), *, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """`configs/model/net/<name>.yaml` with dotlist `overrides` (e.g. `["depth=18"]`,
    `["model_name=mobilenetv3_large_100"]`), for `num_classes` classes and `in_chans` channels, in
    eval mode. Downloads nothing: `pretrained` is forced off."""
    path = NET_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in NET_CONFIGS.glob("*.yaml")))
        raise AutoclsError(f"Unknown network config '{name}'; use one of {known} (configs/model/net/).")
    cfg = OmegaConf.create({"data": {"num_classes": num_classes, "in_chans": in_chans}})
    cfg.net = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    if "pretrained" in cfg.net:
        cfg.net.pretrained = False
    net_cfg = OmegaConf.to_container(cfg, resolve=True)["net"]
    return instantiate(net_cfg).eval()
