"""Optimizers built from a network: parameter groups for weight decay and per-layer learning rates,
then timm's optimizer factory (`timm.optim.create_optimizer_v2`) for the update rule itself.

Configs (`configs/optimizer/*.yaml`) are partials of `build_optimizer`; `ClassifierLitModule`
calls them with the network and the global batch size. Each parameter group carries its own `lr`
(the base lr x its multiplier, also stored as `lr_scale`), so the schedules, which scale every
group's initial lr by one factor, keep the ratios between groups.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

# Names a config may use, all spelled as in timm's optimizer registry: sgd, adam, adamw and rmsprop
# are torch.optim's classes; lamb (You et al. 2020) and lars (You et al. 2017) are timm's.
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "lamb", "lars")

# Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): lr = base_lr x global batch / 256.
REFERENCE_BATCH = 256


def build_optimizer(
    net: nn.Module,
    global_batch_size: int | None = None,
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    no_weight_decay_norm_bias: bool = True,
    lr_mult_list: Sequence[float] | None = None,
    layer_decay: float | None = None,
    scale_lr: bool = False,
    norm_bias_lr_mult: float = 1.0,
    **optimizer_kwargs: Any,
) -> Optimizer:
    """Build optimizer `name` over `net`'s parameters.

    Args:
        net: The network; its `group_matcher` (timm's convention) defines stages and layers.
        global_batch_size: Images per optimizer step over all devices and accumulated batches;
            needed only with `scale_lr`.
        name: One of `OPTIMIZERS`.
        lr: Base learning rate (of the head, which always has multiplier 1).
        weight_decay: Weight decay of the decayed parameters.
        no_weight_decay_norm_bias: Exempt 1-D parameters (normalisation weights, biases) and the
            ones the net lists in `no_weight_decay()` from weight decay: they have too few values to
            overfit, and decaying them only pulls scales and shifts towards 0 ("no bias decay": Jia et
            al. 2018; He et al. 2019, "Bag of Tricks"; timm's `filter_bias_and_bn`).
        lr_mult_list: PaddleClas-style lr multipliers, one per backbone stage in order (e.g. stem
            and 4 stages of a ResNet); the head keeps 1.0.
        layer_decay: Layer-wise lr decay (Bao et al. 2022, BEiT; Clark et al. 2020, ELECTRA): layer
            l of L gets lr x layer_decay^(L - l), the head lr x 1; layers from timm's grouping.
            Combines with `lr_mult_list` by multiplication.
        scale_lr: Scale `lr` (and so every group) by global_batch_size / 256.
        norm_bias_lr_mult: lr multiplier of the biases (shifts) of normalisation layers, whose weight
            decay is divided by it, so the decay per step stays that of the other parameters (the
            `bias_scaler` of airbench, Jordan 2024: BatchNorm shifts learn much faster than weights).
        **optimizer_kwargs: The update rule's own arguments (momentum, nesterov, betas, eps, ...).
    """
    if name not in OPTIMIZERS:
        raise AutoclsError(f"Unknown optimizer.name '{name}'; choose one of {', '.join(OPTIMIZERS)}.")
    if scale_lr:
        lr = scaled_lr(lr, global_batch_size)
    groups = param_groups(net, lr, weight_decay, no_weight_decay_norm_bias, lr_mult_list, layer_decay, norm_bias_lr_mult)
    # timm is imported where it is used: it loads its whole model registry, which importing this
    # module (configs, tests) need not pay for.
    from timm.optim import create_optimizer_v2

    # Every group sets its own lr and weight_decay; timm adds per-optimizer defaults (e.g. alpha=0.9
    # for RMSprop) and drops arguments an optimizer does not take (eps for SGD, betas for LARS).
    try:
        return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)
    except TypeError as err:  # e.g. `optimizer=sgd optimizer.name=adam` passes SGD's nesterov to Adam
        raise AutoclsError(
            f"Optimizer '{name}' does not take these arguments ({err}); select its own config with "
            f"optimizer={name} instead of setting optimizer.name, or remove the key with ~optimizer.<key>."
        ) from err
    except ValueError as err:  # torch.optim's own range checks: "Invalid learning rate: -1", bad betas, ...
        raise AutoclsError(
            f"torch.optim rejects the optimizer settings ({err}); fix optimizer.lr / optimizer.weight_decay or "
            "the update rule's own keys (momentum, betas, eps)."
        ) from err


def global_batch_from(trainer: Any) -> int | None:
    """Images behind one optimizer step: the data module's batch size x devices (x nodes) x gradient
    accumulation; None when the trainer has no data module with a `batch_size`."""
    batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch_size is None:
        return None
    return int(batch_size) * trainer.world_size * trainer.accumulate_grad_batches


def scaled_lr(base_lr: float, global_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al. 2017): base_lr x global_batch / 256."""
    if global_batch is None:
        raise AutoclsError(
            "optimizer.scale_lr=true needs the training batch size, which comes from the data module's "
            "batch_size; train with a data module that has one, or set optimizer.scale_lr=false."
        )
    lr = base_lr * global_batch / REFERENCE_BATCH
    log.info(f"Linear lr scaling: {base_lr:g} x {global_batch} / {REFERENCE_BATCH} = {lr:g}")
    return lr


def param_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float,
    no_weight_decay_norm_bias: bool = True,
    lr_mult_list: Sequence[float] | None = None,
    layer_decay: float | None = None,
    norm_bias_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """One group per distinct (lr multiplier, weight decay) pair, in parameter order; see
    `build_optimizer` for the arguments. Frozen parameters are included (an unfreezing callback can
    then train them; optimizers skip parameters without gradients)."""
    net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper prefixes every parameter name
    scales = {id(p): 1.0 for p in net.parameters()}
    if layer_decay is not None:
        _multiply(scales, _layer_decay_scales(net, layer_decay))
    if lr_mult_list is not None:
        _multiply(scales, _stage_lr_mults(net, lr_mult_list))
    exempt = set(getattr(net, "no_weight_decay", lambda: ())())  # e.g. a ViT's position embedding
    norm_biases = _norm_bias_ids(net) if norm_bias_lr_mult != 1.0 else set()

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for param_name, param in net.named_parameters():
        no_decay = param.ndim <= 1 or any(fnmatch.fnmatch(param_name, pattern) for pattern in exempt)
        decay = 0.0 if no_weight_decay_norm_bias and no_decay else weight_decay
        scale = scales[id(param)]
        if id(param) in norm_biases:
            scale, decay = scale * norm_bias_lr_mult, decay / norm_bias_lr_mult
        group = groups.setdefault(
            (scale, decay), {"params": [], "lr": lr * scale, "lr_scale": scale, "weight_decay": decay}
        )
        group["params"].append(param)
    return list(groups.values())


def _norm_bias_ids(net: nn.Module) -> set[int]:
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(m.bias) for m in net.modules() if isinstance(m, norms) and getattr(m, "bias", None) is not None}


def backbone_stages(net: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone's stages in order, each as (label, parameters), from timm's coarse grouping
    `net.group_matcher(coarse=True)`; the classifier's group (the last, holding
    `net.get_classifier()`) is left out. The label is the stage's module path (`layer1`,
    `stages.0`) or its top-level modules joined by '+' (`conv1+bn1`)."""
    from timm.models import group_parameters

    if not hasattr(net, "group_matcher"):
        raise AutoclsError(
            f"optimizer.lr_mult_list needs a network with timm's group_matcher() to find its stages, and "
            f"{type(net).__name__} has none; use a timm model or set optimizer.lr_mult_list=null."
        )
    by_name = dict(net.named_parameters())
    groups = [names for _, names in sorted(group_parameters(net, net.group_matcher(coarse=True)).items())]
    classifier = getattr(net, "get_classifier", lambda: None)()
    head = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    if groups and any(id(by_name[n]) in head for n in groups[-1]):
        groups = groups[:-1]
    return [(_label(names), [by_name[n] for n in names]) for names in groups]


def _stage_lr_mults(net: nn.Module, lr_mult_list: Sequence[float]) -> dict[int, float]:
    stages = backbone_stages(net)
    if len(lr_mult_list) != len(stages):
        labels = ", ".join(label for label, _ in stages)
        raise AutoclsError(
            f"optimizer.lr_mult_list has {len(lr_mult_list)} values but {type(net).__name__} has "
            f"{len(stages)} stages ({labels}); give one multiplier per stage in that order "
            "(the head keeps 1.0)."
        )
    return {id(p): float(mult) for mult, (_, params) in zip(lr_mult_list, stages) for p in params}


def _layer_decay_scales(net: nn.Module, layer_decay: float) -> dict[int, float]:
    """timm's BEiT-style layer map and scales (by `net.group_matcher(coarse=False)` where the net has
    one, else timm's fallback grouping), as a multiplier per parameter."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(net, weight_decay=0.0, layer_decay=layer_decay)
    return {id(p): group["lr_scale"] for group in groups for p in group["params"]}


def _multiply(scales: dict[int, float], factors: dict[int, float]) -> None:
    for key, factor in factors.items():
        scales[key] *= factor


def _label(names: list[str]) -> str:
    """A stage's name for messages: the module path its parameters share, else their top modules."""
    modules = [name.split(".")[:-1] for name in names]
    common = []
    for parts in zip(*modules):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if common:
        return ".".join(common)
    return "+".join(dict.fromkeys(name.split(".")[0] for name in names))
