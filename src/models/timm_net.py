"""Any timm model as an autocls network, optionally initialised from a local weights file.

timm models already follow the contract autocls relies on (`num_classes`, `num_features`,
`forward_features`, `forward_head`, `reset_classifier`, `get_classifier`), so this module only
turns timm's errors into one-sentence `AutoclsError`s and makes local weights files load correctly.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from torch import nn

from src.utils.errors import AutoclsError


def create_timm_net(
    model_name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create `timm.create_model(model_name, ...)` with a user-facing error for unknown names.

    Args:
        model_name: A timm architecture, optionally with a weights tag (`resnet18.a1_in1k`), or a
            source-prefixed name (`hf-hub:...`), which is passed to timm unchecked.
        num_classes: Number of output classes; 0 makes the classifier an identity.
        in_chans: Number of input channels; timm adapts pretrained stem weights to it.
        pretrained: Load timm's published weights (downloads them unless cached).
        pretrained_file: Local weights to start from instead: a state dict (.pth/.pt/.bin/
            .safetensors) or a checkpoint holding one under `state_dict`, `model` or `state_dict_ema`.
            Implies `pretrained`. The classifier is kept if its size equals `num_classes`, and
            re-initialised otherwise.
        **kwargs: Passed to `timm.create_model` (e.g. `drop_rate`, `drop_path_rate`, `img_size`).
    """
    # Imported here: importing timm takes seconds, and runs with the built-in nets never need it.
    import timm

    _check_model_name(timm, model_name)
    if pretrained_file is None:
        try:
            return timm.create_model(
                model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
        except OSError as err:  # no network, the Hub unreachable, a proxy refusing: all OSErrors
            if not pretrained:
                raise
            raise AutoclsError(
                f"Could not fetch the pretrained weights of timm model '{model_name}' ({type(err).__name__}); run once "
                "with network access (timm caches them), pass model.net.pretrained_file=<local weights>, or set "
                "model.net.pretrained=false."
            ) from err

    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise AutoclsError(
            f"pretrained_file '{pretrained_file}' does not exist; pass the path of a saved state dict "
            "or checkpoint, or drop pretrained_file to start from random (or timm's) weights."
        )
    # Loading the file ourselves (with timm's loader, which unwraps checkpoints and DDP prefixes)
    # lets us tell timm how many classes the file's classifier has. timm otherwise compares
    # num_classes with the registry's (1000 for ImageNet models): it would silently discard the
    # head of a file fine-tuned on exactly num_classes classes, and fail on a file whose head
    # differs from both.
    state_dict = timm.models.load_state_dict(str(path))
    overlay: dict[str, Any] = {"file": str(path), "state_dict": state_dict}
    file_classes = _classifier_size(timm, model_name, state_dict)
    if file_classes is not None:
        # label_offset describes the registry's published weights (an extra background class),
        # not a user's file.
        overlay.update(num_classes=file_classes, label_offset=0)
    try:
        model = timm.create_model(
            model_name,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
    except RuntimeError as err:  # from load_state_dict: size mismatches, missing or unexpected keys
        raise AutoclsError(
            f"The weights in '{pretrained_file}' do not fit timm model '{model_name}' "
            f"({_summarise(err)}); pass a file saved from the same architecture."
        ) from err
    # The cfg would otherwise hold a second reference to every tensor of the file for the life
    # of the model; the path under "file" still records where the weights came from.
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict):
        pretrained_cfg.pop("state_dict", None)
    _check_loaded(model, state_dict, pretrained_file)
    return model


def _check_model_name(timm: Any, model_name: str) -> None:
    """Raise an `AutoclsError` naming close matches if `model_name` is not a timm architecture."""
    if ":" in model_name:  # hf-hub:/local-dir: sources name their architecture in their own config
        return
    if timm.is_model(model_name):  # ignores a weights tag such as `.a1_in1k`
        return
    arch = model_name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f"close names: {', '.join(close)}" if close else "no close names"
    raise AutoclsError(f"Unknown timm model '{model_name}'; {hint} (see timm.list_models()).")


def _classifier_size(timm: Any, model_name: str, state_dict: dict[str, Any]) -> int | None:
    """Number of classes of the classifier in `state_dict`, or None if it has none we can name."""
    cfg = timm.models.get_pretrained_cfg(model_name) if ":" not in model_name else None
    classifiers = getattr(cfg, "classifier", None)
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    for name in classifiers or ():
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _check_loaded(model: nn.Module, state_dict: dict[str, Any], pretrained_file: str) -> None:
    """Fail if the file shares no tensor name with the model's backbone.

    Once timm drops a classifier it loads non-strictly and only logs missing keys, so a file whose
    keys carry a wrapper prefix (e.g. `net.` from a Lightning checkpoint) would otherwise leave the
    whole model at its random initialisation without a word.
    """
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    backbone_keys = [
        key for key in model.state_dict() if not any(key.startswith(f"{c}.") for c in classifiers)
    ]
    if backbone_keys and not any(key in state_dict for key in backbone_keys):
        file_key = next(iter(state_dict), "<none>")
        raise AutoclsError(
            f"No tensor in '{pretrained_file}' matches the model (file has e.g. '{file_key}', the model "
            f"expects e.g. '{backbone_keys[0]}'); save the network's own state_dict without wrapper prefixes."
        )


def _summarise(err: RuntimeError, limit: int = 200) -> str:
    """The gist of a (long, multi-line) load_state_dict error for a one-sentence message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # The first line only says "Error(s) in loading state_dict for X:"; the second names the problem.
    text = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    text = text.rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."
