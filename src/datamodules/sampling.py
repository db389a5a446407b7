"""Which training samples an epoch visits, and in what order: shuffling and class re-balancing.

`data.sampler` chooses how an epoch of the train split is drawn:

* `null` — a random permutation of the split (every image once);
* `oversample` — `len(train)` draws *with replacement*, each image with probability proportional to
  1 / (size of its class), so every class is drawn equally often in expectation (the classic
  re-sampling remedy for imbalanced data; Buda et al. 2018, "A systematic study of the class
  imbalance problem in convolutional neural networks"). The epoch keeps the length of the split
  rather than growing to `n_classes x max class count`: steps per epoch, learning-rate schedules,
  `max_epochs` and HPO budgets then mean the same with and without re-balancing, and a long-tailed
  split does not turn one epoch into many;
* `undersample` — every class contributes `min class count` images drawn *without* replacement (a
  fresh subset each epoch, so over a run the majority classes are still seen in full).

All of it is one function, `epoch_indices`, whose result depends only on `(labels, sampler, seed,
epoch)`: the in-memory loader (`DeviceBatches`) and the streamed one (`ClassBalancedSampler`, a
torch `Sampler`) both draw through it, and a resumed run replays exactly the epoch it stopped in.
Indices are computed on the CPU so the order is the same on every device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from src.utils.errors import AutoclsError

SAMPLERS = ("oversample", "undersample")
"""Valid values of `data.sampler` besides null."""


def check_sampler(sampler: str | None) -> None:
    """One sentence for an unknown `data.sampler`, listing the valid ones."""
    if sampler is not None and sampler not in SAMPLERS:
        raise AutoclsError(f"data.sampler={sampler!r} is not a sampler; use null, {' or '.join(SAMPLERS)}.")


def split_labels(split) -> torch.Tensor:
    """The int64 labels of a `TensorSplit` (`.labels`) or a `FileSplit` (`(path, label)` samples).

    Duck-typed rather than `isinstance`, because `base.py` (which defines the splits) imports this module.
    """
    labels = getattr(split, "labels", None)
    if labels is None:
        labels = torch.tensor([label for _, label in split.samples], dtype=torch.long)
    return labels


def label_counts(split, num_classes: int) -> torch.Tensor:
    """Images per class (`(num_classes,)` int64, on the CPU) of a split, e.g. for balanced class weights."""
    return torch.bincount(split_labels(split).cpu(), minlength=num_classes)


def _present_counts(labels: torch.Tensor) -> torch.Tensor:
    # a class absent from the split cannot be balanced, only ignored
    counts = torch.bincount(labels)
    return counts[counts > 0]


def epoch_size(labels: torch.Tensor, sampler: str | None) -> int:
    """How many samples an epoch of `sampler` draws from a split with these labels."""
    if sampler != "undersample":
        return len(labels)
    present = _present_counts(labels)
    return int(present.min()) * len(present)


def epoch_indices(labels: torch.Tensor, sampler: str | None, seed: int, epoch: int) -> torch.Tensor:
    """The sample indices (CPU int64, in visiting order) of one training epoch; see the module docstring.
    Deterministic in `(seed, epoch)`."""
    check_sampler(sampler)
    # the same generator stream as before samplers existed, so `sampler=null` keeps its exact orders
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if sampler is None:
        return torch.randperm(len(labels), generator=gen)
    labels = labels.cpu()
    counts = torch.bincount(labels)
    if sampler == "oversample":
        # what WeightedRandomSampler(1 / count[y], len(labels)) draws, but reproducible per epoch
        weights = 1.0 / counts[labels].double()
        return torch.multinomial(weights, len(labels), replacement=True, generator=gen)
    # undersample: group a random permutation by class (stable sort keeps it random within each
    # class), keep the first `min count` of every class, then shuffle the classes together
    perm = torch.randperm(len(labels), generator=gen)
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    starts = torch.cumsum(counts, 0) - counts  # where each class's run begins in `grouped`
    rank = torch.arange(len(labels)) - starts[labels[grouped]]
    kept = grouped[rank < int(_present_counts(labels).min())]
    return kept[torch.randperm(len(kept), generator=gen)]


class ClassBalancedSampler(Sampler[int]):
    """`epoch_indices` as a torch `Sampler` for streamed (DataLoader) training data.

    Lightning calls `set_epoch` at the start of every epoch (also through its distributed wrapper),
    so the order follows `(seed, epoch)` exactly like the in-memory loader's.
    """

    def __init__(self, labels: torch.Tensor, sampler: str, seed: int = 0) -> None:
        check_sampler(sampler)
        self.labels, self.sampler, self.seed = labels.cpu(), sampler, seed
        self.epoch = 0
        self._len = epoch_size(self.labels, sampler)  # fixed: the labels never change

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_indices(self.labels, self.sampler, self.seed, self.epoch).tolist())
