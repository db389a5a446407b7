"""Structured channel pruning with torch-pruning, then a short fine-tune (Vega's compression step).

`prune_channels` removes whole output channels (filters) of convolutions and linear layers, ranked
by the L2 norm of their weights (torch-pruning's `GroupMagnitudeImportance`, summed over every layer
coupled to the channel: the BatchNorm after a conv, the next conv's input channels, residual
additions that force several layers to drop the same channels). The result is a smaller dense
network, faster on any backend, not a sparse mask. It loses accuracy, which `fine_tune` regains with
a few epochs of the project's own training (ClassifierLitModule, the run's data, loss and optimizer).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def prune_channels(
    net: nn.Module,
    example: torch.Tensor,
    ratio: float | Mapping[str, float],
    ignored_layers: Iterable[nn.Module | str] | None = None,
    *,
    round_to: int | None = None,
) -> nn.Module:
    """A pruned copy of `net` (the argument is left unchanged).

    Args:
        net: A network with the timm contract (its classifier, `get_classifier()`, is never pruned in
            its outputs; Linear layers with `num_classes` outputs are protected too).
        example: An input batch; torch-pruning traces the network on it to find coupled layers.
        ratio: Fraction of the output channels removed from every prunable layer (0.3 keeps 70%), or
            per-stage ratios keyed by module-name prefix, e.g. `{"layer3": 0.3, "layer4": 0.5}`; layers
            under no key are not pruned.
        ignored_layers: Further modules (or their names in `net`) whose outputs stay whole.
        round_to: Keep channel counts multiples of this (e.g. 8 for tensor-core friendly widths).
    """
    import torch_pruning as tp

    pruned = copy.deepcopy(net).cpu().eval()
    ignored = _protected_layers(pruned) + [_module(pruned, m) if isinstance(m, str) else m for m in ignored_layers or ()]
    if isinstance(ratio, Mapping):
        _check_ratios(ratio.values())
        per_module = {_module(pruned, prefix): float(r) for prefix, r in ratio.items()}
        global_ratio, ratio_dict = 0.0, per_module
    else:
        _check_ratios([ratio])
        global_ratio, ratio_dict = float(ratio), None
    pruner = tp.pruner.MetaPruner(
        pruned,
        example.cpu(),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=global_ratio,
        pruning_ratio_dict=ratio_dict,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    try:
        with torch.no_grad():
            pruned(example.cpu())
        _refresh_num_features(pruned, example.cpu())
    except RuntimeError as err:  # a coupling torch-pruning's tracer did not see
        raise AutoclsError(
            f"Pruning left {type(net).__name__} inconsistent ({str(err).splitlines()[0][:120]}); "
            "pass the layers involved as ignored_layers."
        ) from err
    before, after = _params(net), _params(pruned)
    log.info(f"Pruned {type(net).__name__}: {before / 1e6:.3f}M -> {after / 1e6:.3f}M parameters")
    return pruned


def _check_ratios(ratios: Iterable[float]) -> None:
    for r in ratios:
        if not 0.0 <= float(r) < 1.0:
            raise AutoclsError(f"Pruning ratio {r} is outside [0, 1); it is the fraction of channels removed, e.g. 0.3.")


def _module(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError as err:
        children = ", ".join(n for n, _ in net.named_children())
        raise AutoclsError(f"{type(net).__name__} has no module '{name}'; use a prefix such as one of: {children}.") from err


def _protected_layers(net: nn.Module) -> list[nn.Module]:
    """The classifier and every Linear/1x1 layer producing `num_classes` outputs (the class count is
    an interface, not a width to trade for speed), and the residual stream of option-A ResNets."""
    protected = _zero_pad_residual_stream(net)
    get_classifier = getattr(net, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Module):
        protected.append(classifier)
    num_classes = getattr(net, "num_classes", None)
    for module in net.modules():
        out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        classifier_like = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
        if num_classes and out == num_classes and classifier_like and module not in protected:
            protected.append(module)
    return protected


def _zero_pad_residual_stream(net: nn.Module) -> list[nn.Module]:
    """Layers writing into a residual stream whose shortcuts widen it by zero padding (He et al.'s
    option A, `PadShortcut`). torch-pruning cannot follow channels through `F.pad`, so these keep their
    widths: the stem conv and each block's last conv; the blocks' inner convs are still pruned (as in
    Li et al. 2017's pruning of CIFAR ResNet-56)."""
    from src.models.resnet_cifar import BasicBlock, CifarResNet, PadShortcut

    if not isinstance(net, CifarResNet) or not any(isinstance(m, PadShortcut) for m in net.modules()):
        return []
    return [net.stem[0]] + [block.conv2 for block in net.modules() if isinstance(block, BasicBlock)]


def _refresh_num_features(net: nn.Module, example: torch.Tensor) -> None:
    """Keep the timm contract's widths true after pruning: `num_features` (channels of
    `forward_features`) and timm's `head_hidden_size` (the classifier's input)."""
    if hasattr(net, "num_features") and callable(getattr(net, "forward_features", None)):
        with torch.no_grad():
            features = net.forward_features(example)
        net.num_features = int(features.shape[-1] if features.ndim == 3 else features.shape[1])
    get_classifier = getattr(net, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Linear) and hasattr(net, "head_hidden_size"):
        net.head_hidden_size = classifier.in_features


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
