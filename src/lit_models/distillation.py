"""Teacher -> student training (knowledge distillation, SSLD) as a classifier with a frozen teacher.

`DistillationLitModule` is a `ClassifierLitModule` whose `net` is the student, so its checkpoints
hold the student under `net.*` exactly like a classifier's: `eval.py`, export and prediction use a
distilled student with no special code and never need the teacher. Only training changes:

* the teacher (`teacher_ckpt`, a `train.py` checkpoint, or `teacher`, a timm model with pretrained
  weights) is loaded in `setup("fit")`, never at construction, so rebuilding the module from a
  student checkpoint (eval.py) does not touch the teacher's file;
* it is frozen: no gradients, not in the optimizer (which only sees `net`), kept in eval mode when
  Lightning calls `train()`, and left out of the student's checkpoints (its weights are in its own
  file; they are put back from there when a checkpoint is loaded into a module that has a teacher);
* the training loss is `DistillationLoss` (KD or JS divergence against the teacher's logits, mixed
  with the run's `loss` on the labels by alpha); validation and test use `loss` alone;
* unlabeled training images (label -1, `data.unlabeled`) are distilled but never reach the
  hard-label loss or the accuracy metrics.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial

import torch
from torch import nn

from src.lit_models.classifier import ClassifierLitModule
from src.lit_models.teacher import (
    Teacher,
    check_teacher_fits,
    freeze,
    teacher_from_checkpoint,
)
from src.lit_models.teacher_cache import TeacherLogitCache
from src.losses.distillation import DistillationLoss, labelled_rows
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


class DistillationLitModule(ClassifierLitModule):
    """A classifier (`net`, the student) trained to match a frozen teacher; see the module docstring.

    Args:
        net: The student.
        loss: The classification loss (`loss` group): the hard-label term of `distillation` and the
            validation/test loss.
        optimizer, scheduler, compile, channels_last, tta: As for `ClassifierLitModule`.
        distillation: The training objective (`src.losses.distillation.DistillationLoss`).
        teacher_ckpt: A checkpoint written by `train.py` whose network teaches.
        teacher: Instead of `teacher_ckpt`: a partial returning a `Teacher` given `num_classes`
            (`configs/model/teacher/timm.yaml`).
        student_lr_mult: Multiplies the optimizer's learning rate(s) for the student: 1 from
            scratch; PaddleClas uses 1/100 to 1/10 when the student starts from pretrained weights.
        cache_teacher_logits: Reuse the teacher's logits per image after the first epoch; only
            valid without random augmentation (see `src.lit_models.teacher_cache`), refused otherwise.
    """

    # the data module mixes unlabeled images into training batches only for modules that say so
    learns_from_unlabeled = True

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        distillation: DistillationLoss,
        teacher_ckpt: str | None = None,
        teacher: partial | None = None,
        scheduler: partial | None = None,
        student_lr_mult: float = 1.0,
        cache_teacher_logits: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        tta: str = "none",
    ) -> None:
        if not student_lr_mult > 0:
            raise AutoclsError(f"model.student_lr_mult={student_lr_mult} must be > 0 (1 trains the student at optimizer.lr).")
        with warnings.catch_warnings():
            # the parent's save_hyperparameters also sees this constructor's arguments; the call below
            # replaces its result and leaves the loss module out
            warnings.filterwarnings("ignore", message=".*'distillation' is an instance of `nn.Module`.*")
            super().__init__(net=net, loss=loss, optimizer=optimizer, scheduler=scheduler, compile=compile,
                             channels_last=channels_last, tta=tta)
        self.save_hyperparameters(ignore=["net", "loss", "distillation"], logger=False)
        self.distill_fn = distillation
        self.teacher: nn.Module | None = None  # set in setup("fit")
        self.teacher_cache: TeacherLogitCache | None = None
        self._renormalize = False  # whether the teacher needs the inputs normalised its own way

    # --- the teacher ---------------------------------------------------------------------------
    def _build_teacher(self) -> Teacher:
        ckpt, factory = self.hparams.teacher_ckpt, self.hparams.teacher
        if ckpt and factory is not None:
            raise AutoclsError("Both model.teacher_ckpt and model.teacher are set; keep one of the two teachers.")
        if ckpt:
            return teacher_from_checkpoint(ckpt)
        if factory is not None:
            return factory(num_classes=self.net.num_classes)
        raise AutoclsError(
            "Distillation needs a teacher: pass model.teacher_ckpt=<checkpoint of a train.py run> "
            "(or a timm teacher with +model/teacher=timm model.teacher.model_name=<name>)."
        )

    def _attach_teacher(self) -> None:
        teacher = self._build_teacher()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        describe = datamodule.describe() if datamodule is not None and hasattr(datamodule, "describe") else {}
        check_teacher_fits(
            teacher,
            num_classes=self.net.num_classes,
            in_chans=describe.get("in_chans", teacher.in_chans),
            class_names=describe.get("class_names"),
            image_size=describe.get("image_size"),
        )
        self.teacher = freeze(teacher.net)
        if self.hparams.channels_last:  # as the student: NHWC weights and inputs
            self.teacher.to(memory_format=torch.channels_last)
        # Lightning warns about modules in eval mode when training starts: the teacher's are, on purpose
        count = sum(1 for _ in self.teacher.modules())
        warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start of training")
        # The teacher sees images normalised as in its own training: x_t = x * scale + shift turns
        # the student's normalisation into the teacher's (identity when they agree).
        mean, std = describe.get("mean", teacher.mean), describe.get("std", teacher.std)
        scale = torch.tensor(std) / torch.tensor(teacher.std)
        shift = (torch.tensor(mean) - torch.tensor(teacher.mean)) / torch.tensor(teacher.std)
        self._renormalize = not (torch.allclose(scale, torch.ones_like(scale)) and torch.allclose(shift, torch.zeros_like(shift)))
        # not persistent: they follow the module to its device but stay out of checkpoints
        self.register_buffer("teacher_input_scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("teacher_input_shift", shift.view(1, -1, 1, 1), persistent=False)
        log.info(f"Teacher: {teacher.source} ({sum(p.numel() for p in self.teacher.parameters()):,} parameters, frozen)")

    def _check_augmentation_for_cache(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        augmentation = getattr(datamodule, "augmentation", None)
        if augmentation is not None and (len(augmentation.ops) or augmentation.mixing is not None):
            raise AutoclsError(
                f"model.cache_teacher_logits=true needs augmentation=none, but the run augments randomly "
                f"({', '.join([*augmentation.ops, *(['mixing'] if augmentation.mixing is not None else [])])}), "
                f"so the teacher sees a new image every epoch; set augmentation=none or model.cache_teacher_logits=false."
            )

    def _check_views(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        ops = getattr(getattr(datamodule, "augmentation", None), "ops", {}) or {}
        if any(getattr(op, "views", 1) > 1 for op in ops.values()):
            raise AutoclsError(
                "AugMix jsd=true returns three views per image, which distillation does not pair with the teacher; "
                "set augmentation.ops.augmix.jsd=false."
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher is None:
            self._check_views()
            self._attach_teacher()
            if self.hparams.cache_teacher_logits:
                self._check_augmentation_for_cache()
                self.teacher_cache = TeacherLogitCache()
        super().setup(stage)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher_cache is not None:
            return self.teacher_cache.logits(images, self._run_teacher)
        return self._run_teacher(images)

    def _run_teacher(self, images: torch.Tensor) -> torch.Tensor:
        if self._renormalize:
            images = images * self.teacher_input_scale.to(images.dtype) + self.teacher_input_shift.to(images.dtype)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.teacher(images)

    # --- checkpoints: the student only -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a module that already has its teacher (fit, then test of the best checkpoint) gets the
        # teacher's own weights back, so the strict load finds every key
        if self.teacher is not None:
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.teacher.state_dict().items():
                state.setdefault(TEACHER_PREFIX + key, value)

    # --- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, target = batch
        logits = self(images)
        teacher_logits = self.teacher_logits(images)
        distill = self.distill_fn
        soft = distill.soft_term(logits, teacher_logits)
        if distill.uses_labels:
            hard = distill.hard_term(logits, target, self.loss_fn)
            loss = distill.alpha * soft + (1 - distill.alpha) * hard
            self.log("train/loss_hard", hard.detach(), on_step=False, on_epoch=True)
        else:
            loss = soft
        self.log("train/loss_distill", soft.detach(), on_step=False, on_epoch=True)

        labelled = labelled_rows(target)
        metrics = self.train_metrics
        if bool(labelled.any()):  # unlabeled images have no accuracy
            labels = target[labelled]
            labels = labels.argmax(dim=1) if labels.is_floating_point() else labels
            for name in ("acc", "acc_top5"):
                metrics[name].update(logits.detach()[labelled], labels)
        for name in ("acc", "acc_top5"):
            self.log(f"train/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name == "acc")
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        metrics["loss"].update(loss.detach(), weight=len(images))
        self.log("train/loss_epoch", metrics["loss"], on_step=False, on_epoch=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        cache = self.teacher_cache
        if cache is not None and cache.lookups:
            self.log("train/teacher_cache_hit_rate", cache.hits / cache.lookups)
            cache.reset_counts()

    def configure_optimizers(self):
        config = super().configure_optimizers()
        mult = self.hparams.student_lr_mult
        if mult != 1.0:
            optimizer = config["optimizer"]
            for group in optimizer.param_groups:
                group["lr"] *= mult
                if "initial_lr" in group:
                    group["initial_lr"] *= mult
            scheduler = config.get("lr_scheduler", {}).get("scheduler")
            if scheduler is not None:  # schedules scale the base lrs they recorded when built
                scheduler.base_lrs = [lr * mult for lr in scheduler.base_lrs]
        return config
