"""The frozen teacher of a distillation run: where it comes from and whether it fits the student.

A teacher is a network of the shared contract plus what it was trained on (class count and names,
input normalisation), so `DistillationLitModule` can refuse a teacher for other classes with one
sentence and feed it images normalised the way it was trained, even when the student's data
config normalises differently.

Two sources:
* `teacher_from_checkpoint(path)`: a `train.py` checkpoint (any network, including a distilled
  student), rebuilt with `src.deploy.trained_net.load_trained_net`;
* `timm_teacher(model_name, ...)`: timm's published weights (or a local weights file), which
  must already predict the data's classes: a freshly initialised head would be a silent untrained
  teacher, so a class-count mismatch is an error, never a new head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    net: nn.Module
    num_classes: int
    in_chans: int
    mean: tuple[float, ...]  # the input normalisation the teacher was trained with
    std: tuple[float, ...]
    source: str  # how the user named it, for messages
    class_names: list[str] | None = None
    image_size: int | None = None


def teacher_from_checkpoint(ckpt_path: str | Path) -> Teacher:
    """The network of a `train.py` checkpoint as a teacher."""
    from src.deploy.trained_net import load_trained_net

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise AutoclsError(
            f"model.teacher_ckpt={ckpt_path} does not exist; pass a checkpoint written by train.py "
            f"(a run's checkpoints/*.ckpt) for the teacher."
        )
    trained = load_trained_net(path)
    data = trained.data
    return Teacher(
        net=trained.net,
        num_classes=int(data["num_classes"]),
        in_chans=int(data["in_chans"]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        source=f"model.teacher_ckpt={path}",
        class_names=trained.class_names,
        image_size=int(data["image_size"]),
    )


def timm_teacher(
    model_name: str, num_classes: int, in_chans: int = 3, pretrained_file: str | None = None
) -> Teacher:
    """A timm model with pretrained weights (timm's, or `pretrained_file`) as a teacher.

    Configs give it as a partial (`configs/model/teacher/timm.yaml`); the distillation module adds
    `num_classes` (the student's). The weights' classifier must have exactly that many classes.
    """
    from src.models.timm_net import create_timm_net

    net = create_timm_net(
        model_name, num_classes=num_classes, in_chans=in_chans, pretrained=True, pretrained_file=pretrained_file
    )
    cfg = getattr(net, "pretrained_cfg", None) or {}
    weights_classes = cfg.get("num_classes")
    if weights_classes != num_classes:
        raise AutoclsError(
            f"The weights of timm teacher {model_name} predict {weights_classes} classes but the data has {num_classes}; "
            f"fine-tune it on this data with train.py and pass model.teacher_ckpt=<its checkpoint> instead."
        )
    return Teacher(
        net=net,
        num_classes=num_classes,
        in_chans=in_chans,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        source=f"timm {model_name}" + (f" from {pretrained_file}" if pretrained_file else ""),
        image_size=(cfg.get("input_size") or (None, None, None))[-1],
    )


def check_teacher_fits(
    teacher: Teacher, num_classes: int, in_chans: int, class_names: Sequence[str] | None, image_size: int | None
) -> None:
    """One sentence when the teacher cannot supervise this data; a log line when it merely sees
    another image size than it was trained at."""
    if teacher.num_classes != num_classes:
        raise AutoclsError(
            f"The teacher ({teacher.source}) predicts {teacher.num_classes} classes but the data has {num_classes}; "
            f"distil from a teacher trained on the same {num_classes} classes."
        )
    if teacher.in_chans != in_chans:
        raise AutoclsError(
            f"The teacher ({teacher.source}) takes {teacher.in_chans}-channel images but the data has {in_chans}; "
            f"distil from a teacher trained on images like these."
        )
    if teacher.class_names and class_names and list(teacher.class_names) != list(class_names):
        first = next(i for i, (a, b) in enumerate(zip(teacher.class_names, class_names)) if a != b)
        raise AutoclsError(
            f"The teacher ({teacher.source}) calls class {first} {teacher.class_names[first]!r} but the data calls it "
            f"{class_names[first]!r}; distil from a teacher trained on these classes in the same order."
        )
    if teacher.image_size and image_size and teacher.image_size != image_size:
        log.warning(
            f"The teacher was trained on {teacher.image_size}px images and sees {image_size}px ones here; "
            f"its predictions may be worse than its accuracy suggests."
        )


def freeze(net: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm statistics and dropout fixed)."""
    net.requires_grad_(False)
    return net.eval()
