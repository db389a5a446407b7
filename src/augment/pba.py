"""Population Based Augmentation (Ho et al. 2019): a policy schedule learnt by `scripts/pba_search.py`,
replayed while training (`augmentation=pba augmentation.schedule=<schedule.json>`).

A *policy* is a list of (op, probability level 0..10, magnitude level 0..9) entries, every op of
torchvision's RandAugment space (the PBA paper's ops less Cutout and SamplePairing) twice, as in the
paper. Each image draws how many entries to use (0, 1 or 2 with probabilities 0.2, 0.3, 0.5), picks that
many distinct entries uniformly, and applies each with its probability at its magnitude. A *schedule* is
the policy per epoch of the search; a run of another length replays it stretched to its own epochs
(epoch e of E uses the search policy of epoch floor(e * E_search / E)), as the paper does.

The schedule file (JSON):

    {"format": "autocls-pba-schedule", "epochs": 8, "ops": [...], "schedule": [
        {"epoch": 0, "policy": [["Rotate", 0, 0], ["Rotate", 0, 0], ["ShearX", 0, 0], ...]},
        {"epoch": 2, "policy": [...]}, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.transforms import v2

from src.augment.mixing import BatchMixing
from src.augment.pipeline import Augmentation
from src.augment.policies import _Policy
from src.utils.errors import AutoclsError

FORMAT = "autocls-pba-schedule"
SPACE = v2.RandAugment._AUGMENTATION_SPACE
OPS = tuple(k for k in SPACE if k != "Identity")
PROB_LEVELS, MAGNITUDE_LEVELS = 11, 10  # probability p/10 for p in 0..10; magnitude bins 0..9
# how many policy entries an image uses: 0, 1 or 2 (Ho et al. 2019, Algorithm 1)
COUNT_PROBS = (0.2, 0.3, 0.5)


def zero_policy() -> list[list]:
    """The search's starting point: every op twice, probability and magnitude 0 (no augmentation)."""
    return [[op, 0, 0] for op in OPS for _ in range(2)]


def write_schedule(path: str | Path, schedule: Sequence[tuple[int, list]], epochs: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"epoch": int(e), "policy": [list(x) for x in p]} for e, p in sorted(schedule, key=lambda s: s[0])]
    path.write_text(json.dumps({"format": FORMAT, "epochs": int(epochs), "ops": list(OPS), "schedule": entries},
                               indent=1))
    return path


def read_schedule(path: str | Path) -> dict:
    """A schedule file, checked: known ops, levels in range, epochs from 0 upwards."""
    path = Path(path)
    if not path.is_file():
        raise AutoclsError(f"PBA schedule {path} does not exist; pass augmentation.schedule=<schedule.json from "
                           "scripts/pba_search.py>.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AutoclsError(f"PBA schedule {path} is not JSON ({exc.msg}); pass a schedule.json from "
                           "scripts/pba_search.py.") from exc
    if not isinstance(data, Mapping) or data.get("format") != FORMAT or not data.get("schedule"):
        raise AutoclsError(f"{path} is not a PBA schedule (no '{FORMAT}' format with a schedule); pass a "
                           "schedule.json from scripts/pba_search.py.")
    for entry in data["schedule"]:
        for op, p, m in entry["policy"]:
            if op not in OPS or not 0 <= p < PROB_LEVELS or not 0 <= m < MAGNITUDE_LEVELS:
                raise AutoclsError(f"PBA schedule {path} has the entry {[op, p, m]}; ops must be among {list(OPS)}, "
                                   f"probabilities 0..{PROB_LEVELS - 1}, magnitudes 0..{MAGNITUDE_LEVELS - 1}.")
    if data["schedule"][0]["epoch"] != 0:
        raise AutoclsError(f"PBA schedule {path} starts at epoch {data['schedule'][0]['epoch']}, not 0.")
    return data


class PBAPolicy(_Policy):
    """The op that applies a PBA schedule to a batch on the device; `set_epoch` selects the policy."""

    def __init__(self, schedule: str | Path, fill: float = 0.5, interpolation: str = "nearest") -> None:
        super().__init__(SPACE, MAGNITUDE_LEVELS, fill, interpolation)
        data = read_schedule(schedule)
        self.search_epochs = max(int(data["epochs"]), 1)
        self.starts = [int(e["epoch"]) for e in data["schedule"]]
        self.policies = [self._encode(e["policy"]) for e in data["schedule"]]
        self.epoch, self.epochs = 0, self.search_epochs

    def _encode(self, policy: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ops = torch.tensor([self.names.index(op) for op, _, _ in policy])
        probs = torch.tensor([p / (PROB_LEVELS - 1) for _, p, _ in policy])
        bins = torch.tensor([m for _, _, m in policy])
        return ops, probs, bins

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch = int(epoch)
        self.epochs = int(epochs) if epochs and epochs > 0 else self.search_epochs  # max_epochs=-1: no stretch

    def policy_index(self) -> int:
        """The schedule entry for the current epoch, the search's epochs stretched to this run's."""
        search_epoch = self.epoch * self.search_epochs // self.epochs
        return max(i for i, start in enumerate(self.starts) if start <= search_epoch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, probs, bins = self.policies[self.policy_index()]
        b, n = x.shape[0], len(ops)
        count = torch.multinomial(torch.tensor(COUNT_PROBS), b, replacement=True)
        first = torch.randint(n, (b,))
        picks = [first, (first + torch.randint(1, n, (b,))) % n]  # two distinct entries per image
        for step, pick in enumerate(picks):
            applies = (step < count) & (torch.rand(b) < probs[pick])
            x = self._apply(x, torch.where(applies, ops[pick], 0), bins[pick])
        return x

    def sample_transform(self, image_size: int) -> v2.Transform:
        raise AutoclsError("augmentation=pba changes its policy every epoch on the device, so it needs in-memory "
                           "data; set data.in_memory=true (or a smaller data.image_size).")


class PBAAugmentation(Augmentation):
    """`augmentation=pba`: the configured ops (pad-crop and flip from `standard`), then the PBA policy
    of `schedule`; `augmentation.schedule` is the one setting a user gives."""

    def __init__(self, schedule: str, ops: Mapping[str, nn.Module | None] | None = None,
                 mixing: BatchMixing | None = None, fill: float = 0.5, interpolation: str = "nearest") -> None:
        if not schedule:
            raise AutoclsError("augmentation=pba needs augmentation.schedule=<schedule.json from scripts/pba_search.py>.")
        super().__init__({**(ops or {}), "pba": PBAPolicy(schedule, fill, interpolation)}, mixing)


class PBASchedule(pl.Callback):
    """Feeds the epoch to the PBA op at the start of every training epoch (added by augmentation=pba).
    Stateless: the epoch comes from the trainer, so a resumed run picks up the schedule where it was."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        augmentation = getattr(getattr(trainer, "datamodule", None), "augmentation", None)
        ops = [op for op in getattr(augmentation, "ops", {}).values() if isinstance(op, PBAPolicy)]
        if not ops:
            raise AutoclsError("callbacks.pba_schedule needs the PBA op; use augmentation=pba.")
        for op in ops:
            op.set_epoch(trainer.current_epoch, trainer.max_epochs)
            pl_module.log("train/pba_policy", float(op.policy_index()), on_step=False, on_epoch=True)
