"""Per-stage channel pruning of a trained network, built by Hydra as a training run's `model.net`.

Vega's compression search treats each stage's pruning ratio as a gene. Here a trial of that search
is an ordinary `train.py` run: `model/net=pruned` instantiates `pruned_net(ckpt_path, stage_ratios)`,
which loads the trained network of a checkpoint, removes `stage_ratios[i]` of the output channels of
every prunable layer in stage i (`src.deploy.prune.prune_channels`: torch-pruning, L2 magnitude,
classifier kept whole) and hands the smaller network to the classifier, which fine-tunes it with the
run's recipe. `callbacks=latency_export` then exports and times it; the sweep
(`hparams_search=cifar10_prune_mo`) trades its accuracy against its latency with NSGA-II.

Because the pruned width of every layer follows from the base weights and the ratios alone, the
config of such a run (checkpoint path + ratios) rebuilds the same architecture: `load_trained_net`,
`eval.py`, `scripts/export.py` and `predict.py` work on the fine-tuned checkpoints as on any other,
as long as the base checkpoint is where the config says.

Stages are timm's coarse parameter groups (`net.group_matcher(coarse=True)`), the same stages
`optimizer.lr_mult_list` scales, less the stem and the classifier: `stages.0..2` of a CIFAR ResNet-20,
`layer1..4` of a timm ResNet, `blocks.0..5` and `conv_head` of a MobileNetV3.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from src.utils.errors import AutoclsError, ConfigError

log = logging.getLogger(__name__)

# what `pruned_net` compares between the run's data and the data the base network was trained on
_DATA_KEYS = ("num_classes", "in_chans", "image_size", "mean", "std")
# the layers whose output channels torch-pruning removes
_PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Stage:
    name: str  # e.g. `stages.0`, `layer1`, or `blocks.6+bn2+conv_head` for a group of several modules
    modules: tuple[str, ...]  # module names in the network covering the stage's parameters

    def parameters(self, net: nn.Module) -> int:
        return sum(p.numel() for m in self.modules for p in net.get_submodule(m).parameters())


def network_stages(net: nn.Module) -> list[Stage]:
    """The stages of `net` in forward order (see the module docstring)."""
    from timm.models import group_parameters

    matcher = getattr(net, "group_matcher", None)
    if not callable(matcher):
        raise ConfigError(
            f"{type(net).__name__} has no group_matcher() (timm's stage grouping), so its stages are unknown; "
            "use a timm or autocls network, or prune it with one ratio (src.deploy.prune.prune_channels)."
        )
    groups = matcher(coarse=True)
    stem = groups.get("stem") if isinstance(groups, Mapping) else None
    stem_patterns = [stem] if isinstance(stem, str) else [p for p, _ in stem or ()]
    get_classifier = getattr(net, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    head = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    params = dict(net.named_parameters())
    stages = []
    for _, names in sorted(group_parameters(net, groups).items()):
        if stem_patterns and all(any(re.match(p, n) for p in stem_patterns) for n in names):
            continue  # the stem feeds the first stage's residual stream: pruned with it or not at all
        names = [n for n in names if id(params[n]) not in head and "." in n]  # no classifier, no bare tensors
        modules = _covering_modules(names, list(params))
        # a group without convolutions or linear layers (a final norm) has no channels of its own to prune
        if any(isinstance(m, _PRUNABLE) for name in modules for m in net.get_submodule(name).modules()):
            stages.append(Stage("+".join(modules), tuple(modules)))
    return stages


def _covering_modules(names: list[str], all_names: list[str]) -> list[str]:
    """The largest modules whose parameters are all among `names` and together hold them, in order
    (`blocks.1.0.conv_pw.weight`, ..., `blocks.1.1.bn3.bias` -> `blocks.1`)."""
    mine = set(names)

    def only_mine(module: str) -> bool:
        return all(n in mine for n in all_names if n.startswith(module + "."))

    covering: list[str] = []
    for name in names:
        if any(name.startswith(m + ".") for m in covering):
            continue
        parts = name.split(".")[:-1]
        depth = 1
        while depth < len(parts) and not only_mine(".".join(parts[:depth])):
            depth += 1
        covering.append(".".join(parts[:depth]))
    return covering


def stage_ratio_map(net: nn.Module, stage_ratios: Sequence[float]) -> dict[str, float]:
    """`prune_channels`' per-module ratios for one ratio per stage (checked: count and range)."""
    stages = network_stages(net)
    ratios = list(stage_ratios)
    if len(ratios) != len(stages):
        raise ConfigError(
            f"stage_ratios has {len(ratios)} values but {type(net).__name__} has {len(stages)} stages "
            f"({', '.join(s.name for s in stages)}); give one ratio per stage in that order, e.g. "
            f"model.net.stage_ratios=[{','.join(['0.0'] * len(stages))}]."
        )
    for stage, ratio in zip(stages, ratios):
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ConfigError(
                f"The pruning ratio {ratio} of stage {stage.name} is outside [0, 1); it is the fraction of "
                "channels removed (0 keeps the stage whole), so search it in e.g. range(0.0, 0.8, 0.1)."
            )
    return {module: float(ratio) for stage, ratio in zip(stages, ratios) for module in stage.modules}


def prune_stages(net: nn.Module, example, stage_ratios: Sequence[float]) -> nn.Module:
    """A copy of `net` with `stage_ratios[i]` of the channels of stage i removed (see `network_stages`)."""
    from src.deploy.prune import prune_channels

    return prune_channels(net, example, stage_ratio_map(net, stage_ratios))


def stage_parameters(net: nn.Module) -> dict[str, int]:
    """Parameters per stage, by stage name (for logs and checks)."""
    return {stage.name: stage.parameters(net) for stage in network_stages(net)}


def pruned_net(ckpt_path: str | None, stage_ratios: Sequence[float], data: Mapping | None = None) -> nn.Module:
    """The network of the train.py checkpoint `ckpt_path`, pruned per stage, in train mode (ready to be
    fine-tuned; Lightning keeps the mode a module arrives in).

    Args:
        ckpt_path: The trained model to compress.
        stage_ratios: One fraction of channels to remove per stage, each in [0, 1).
        data: The run's data description (num_classes, in_chans, image_size, mean, std); each given
            value must match what the base network was trained on, since fine-tuning on other classes,
            channels or normalisation would silently start from a broken network.
    """
    from src.deploy.onnx_export import example_input
    from src.deploy.trained_net import load_trained_net

    if not ckpt_path:
        raise ConfigError("model.net.ckpt_path is not set; pass the train.py checkpoint to compress, "
                          "e.g. model.net.ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt.")
    if not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"The base checkpoint {ckpt_path} does not exist; pass an existing train.py checkpoint "
                          "as model.net.ckpt_path.")
    try:
        trained = load_trained_net(Path(ckpt_path).expanduser())
    except AutoclsError as err:
        raise ConfigError(str(err)) from err
    _check_data(trained.data, data or {}, ckpt_path)
    base = stage_parameters(trained.net)
    pruned = prune_stages(trained.net, example_input(trained.input_shape, 2), stage_ratios)
    after = stage_parameters(pruned)
    log.info("Pruned stages of %s: %s", ckpt_path,
             ", ".join(f"{name} x{ratio:g} {base[name]} -> {after[name]}" for name, ratio in zip(base, stage_ratios)))
    return pruned.train()


def _check_data(trained: Mapping, run: Mapping, ckpt_path) -> None:
    for key in _DATA_KEYS:
        want, have = trained.get(key), run.get(key)
        if want is None or have is None:
            continue
        same = (all(math.isclose(float(a), float(b), abs_tol=1e-4) for a, b in zip(want, have)) and len(want) == len(have)
                if isinstance(want, (list, tuple)) else want == have)
        if not same:
            raise ConfigError(
                f"The base checkpoint {ckpt_path} was trained with data.{key}={want} but this run's data has {have}; "
                f"fine-tune on the data the base network was trained on (data.{key}={want})."
            )
