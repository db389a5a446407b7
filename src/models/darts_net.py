"""DARTS evaluation networks: a genotype's cells stacked and trained from scratch (Liu et al. 2019,
section 3.2 and appendix A.1).

`NetworkCIFAR` is the paper's CIFAR-10 network (20 cells and 36 initial channels give the 3.3M
parameters of its Table 1), `NetworkImageNet` the mobile-setting ImageNet one (14 cells, 48
channels, three stride-2 stem convs for 224 px inputs). Both follow timm's net contract.

Regularisers of the paper's recipe:
* drop path (Larsson et al. 2017, FractalNet; Zoph et al. 2018): each non-identity edge of a cell is
  dropped per sample with probability `drop_path_prob`, which `src.callbacks.drop_path_ramp` raises
  linearly over training as the DARTS code does;
* the auxiliary head (Szegedy et al. 2015) on the output of the second reduction cell:
  `forward_with_aux(x)` returns `(logits, aux_logits)`, and `ClassifierLitModule` adds
  `model.aux_weight` x its loss in training. `forward(x)` always returns the logits alone, so
  metrics, evaluation and export see a plain classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from src.nas.genotypes import Edge, Genotype, parse_genotype
from src.nas.operations import OPS, FactorizedReduce, ReLUConvBN
from src.utils.errors import AutoclsError


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of `x` with probability `drop_prob`, scaling the kept ones by 1/keep so the
    expected value is unchanged."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """A cell of a genotype: node i sums the ops of edges 2i and 2i+1, the output concatenates the
    genotype's `concat` nodes."""

    def __init__(
        self,
        edges: Sequence[Edge],
        concat: Sequence[int],
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0)
        self.inputs = [j for _, j in edges]
        self.ops = nn.ModuleList(OPS[op](C, 2 if reduction and j < 2 else 1, True) for op, j in edges)
        self.concat = list(concat)
        self.multiplier = len(concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.inputs[k]])
                # an identity edge is left alone: dropping it would cut the cell's shortcut
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """ReLU -> 5x5 average pool -> 1x1 conv (128) -> BN -> ReLU -> 2x2 conv (768) -> BN -> ReLU ->
    linear; `pool_stride` 3 for CIFAR's 8x8 maps (32 px inputs) and 2 for ImageNet's 7x7 (224 px), both
    giving 2x2 before the last conv. The DARTS ImageNet head lacks the second BN (a typo the paper's runs kept)."""

    def __init__(self, C: int, num_classes: int, pool_stride: int, second_bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
        ]
        if second_bn:
            layers.append(nn.BatchNorm2d(768))
        layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _DartsNetwork(nn.Module):
    """What the CIFAR and ImageNet networks share: cells from a genotype, the auxiliary head after
    the second reduction cell, drop path, and timm's head methods. Subclasses build `self.stem(x)`,
    returning the two first cell inputs."""

    aux_pool_stride = 3
    aux_second_bn = True

    def _build(
        self,
        C: int,
        num_classes: int,
        layers: int,
        auxiliary: bool,
        genotype: Genotype | str,
        drop_path_prob: float,
        c_stem: int,
        reduction_prev: bool,
    ) -> None:
        if not 0.0 <= drop_path_prob < 1.0:
            raise AutoclsError(f"model.net.drop_path_prob={drop_path_prob} must be in [0, 1); use 0 to switch it off.")
        if layers < 3:
            raise AutoclsError(f"model.net.layers={layers} is too few; a DARTS network needs at least 3 cells.")
        self.genotype = parse_genotype(genotype, origin="model.net.genotype")
        self.num_classes, self.layers, self.auxiliary = num_classes, layers, auxiliary
        self.drop_path_prob = drop_path_prob  # the current rate; DropPathRamp changes it during training
        self.aux_index = 2 * layers // 3  # the second reduction cell

        c_prev_prev, c_prev, c_curr = c_stem, c_stem, C
        cells, c_aux = [], None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            edges, concat = self.genotype.cell(reduction)
            cell = Cell(edges, concat, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_index:
                c_aux = c_prev
        self.cells = nn.ModuleList(cells)
        self.num_features = c_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, self.aux_pool_stride, self.aux_second_bn)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes) if num_classes > 0 else nn.Identity()

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _features(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0, s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if with_aux and i == self.aux_index:
                aux = self.auxiliary_head(s1)
        return s1, aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits); the latter is None without an auxiliary head."""
        features, aux = self._features(x, with_aux=self.auxiliary)
        return self.forward_head(features), aux

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.auxiliary:
            self.auxiliary_head.classifier = nn.Linear(768, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter grouping: the stem, then each cell (the heads form the last group)."""
        return {"stem": r"^stem", "blocks": r"^cells\.(\d+)"}


class NetworkCIFAR(_DartsNetwork):
    """The DARTS CIFAR network: a 3x3 conv stem with 3C channels, `layers` cells of the genotype
    (reduction cells at 1/3 and 2/3 of the depth), global pooling and a linear classifier.

    Args:
        C: Initial channels (36 in the paper), doubled at each reduction cell.
        num_classes: Output classes.
        layers: Number of cells (20 in the paper).
        auxiliary: Add the auxiliary head after the second reduction cell (`forward_with_aux`).
        genotype: A `Genotype`, a named genotype (DARTS_V2, ...), a JSON file or a genotype string.
        drop_path_prob: Drop-path rate of the non-identity edges (the paper's final value is 0.2;
            `callbacks=drop_path_ramp` ramps it up from 0).
        in_chans: Input channels.
    """

    def __init__(
        self,
        C: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        auxiliary: bool = False,
        genotype: Genotype | str = "DARTS_V2",
        drop_path_prob: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        stem_channels = 3 * C
        self.stem_conv = nn.Sequential(
            nn.Conv2d(in_chans, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels)
        )
        self._build(C, num_classes, layers, auxiliary, genotype, drop_path_prob, stem_channels, reduction_prev=False)

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem_conv(x)
        return s, s


class NetworkImageNet(_DartsNetwork):
    """The DARTS ImageNet (mobile setting) network: two stride-2 stems (224 -> 56 -> 28 px) feeding
    the first cell's two inputs, `layers` cells, global pooling and a linear classifier; the same
    arguments as `NetworkCIFAR` (the paper: C=48, layers=14)."""

    aux_pool_stride = 2
    aux_second_bn = False

    def __init__(
        self,
        C: int = 48,
        num_classes: int = 1000,
        layers: int = 14,
        auxiliary: bool = False,
        genotype: Genotype | str = "DARTS_V2",
        drop_path_prob: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_chans, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        # the first cell's older input (stem0) has twice the resolution of stem1: reduction_prev
        self._build(C, num_classes, layers, auxiliary, genotype, drop_path_prob, C, reduction_prev=True)

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^stem[01]", "blocks": r"^cells\.(\d+)"}
