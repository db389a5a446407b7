"""The DARTS search network: every candidate op on every edge, mixed by architecture weights.

`DartsSupernet` is the over-parameterised network of Liu et al. 2019 (section 2.2): `layers` cells
(reduction cells at 1/3 and 2/3 of the depth), each with `steps` intermediate nodes; an edge is a
`MixedOp`, the softmax(alpha)-weighted sum of all `primitives`. The architecture parameters
`alphas_normal` and `alphas_reduce` (one row per edge, one column per op, shared by all cells of a
type) are real `nn.Parameter`s of the module, so they are saved in checkpoints and follow the module
to its device; `arch_parameters()` and `weight_parameters()` separate them for the two optimisers.

Options:
* `partial_channels=k > 1`: PC-DARTS (Xu et al. 2020, "PC-DARTS: Partial Channel Connections for
  Memory-Efficient Architecture Search"): each edge mixes the ops on 1/k of the channels and passes
  the rest through (max-pooled on reduction edges), then shuffles channels so that another subset
  is searched in the next cell; edge normalisation parameters `betas_normal`/`betas_reduce` weight
  each node's incoming edges, which stabilises the derived genotype against the sampling noise.
* `forward(x, genotype)`: a single path through the shared weights (each node sums only its two
  genotype edges, each running only its chosen op), how CARS evaluates population members.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from src.nas.derive import (
    derive_genotype,
    edge_softmax,
    node_slices,
    num_edges,
    op_weights,
)
from src.nas.genotypes import PRIMITIVES, Edge, Genotype
from src.nas.operations import OPS, FactorizedReduce, ReLUConvBN
from src.utils.errors import AutoclsError


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups (ShuffleNet, Zhang et al. 2018)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """One edge of the search cell: all `primitives` on the same input, mixed by weights, or one of
    them alone (`single`). With `partial_channels=k` only the first C/k channels go through the ops."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str], partial_channels: int = 1):
        super().__init__()
        self.stride, self.k = stride, partial_channels
        c = C // partial_channels
        self.ops = nn.ModuleDict()
        for name in primitives:
            op = OPS[name](c, stride, False)
            if "pool" in name:
                # pools have no weights to scale their output; an affine-free BN puts them on the
                # same scale as the (BN-terminated) conv ops they are mixed with (as in DARTS)
                op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
            self.ops[name] = op
        self.names = tuple(primitives)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        searched, bypass = self._split(x)
        # 'none' outputs zeros: skipping it saves its memory and changes neither the sum nor any
        # gradient (its weight still enters every other op's weight through the softmax)
        out = sum(w * op(searched) for w, (name, op) in zip(weights, self.ops.items()) if name != "none")
        return self._merge(out, bypass)

    def single(self, x: torch.Tensor, name: str) -> torch.Tensor:
        searched, bypass = self._split(x)
        return self._merge(self.ops[name](searched), bypass)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.k == 1:
            return x, None
        c = x.shape[1] // self.k
        return x[:, :c], x[:, c:]

    def _merge(self, out: torch.Tensor, bypass: torch.Tensor | None) -> torch.Tensor:
        if bypass is None:
            return out
        if self.stride > 1:
            # ceil_mode: the same ceil(H/2) as the stride-2 ops, for odd sizes too
            bypass = F.max_pool2d(bypass, self.stride, self.stride, ceil_mode=True)
        return channel_shuffle(torch.cat([out, bypass], dim=1), self.k)


class SearchCell(nn.Module):
    """A cell of the supernet: two preprocessed inputs, `steps` nodes each summing a MixedOp on every
    earlier node, output = the last `multiplier` nodes concatenated (multiplier x C channels)."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        primitives: Sequence[str],
        partial_channels: int = 1,
    ):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        # after a reduction cell the input two cells back has twice the resolution of the other
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1, primitives, partial_channels)
            for i in range(steps)
            for j in range(2 + i)
        )
        self.offsets = [rows.start for rows in node_slices(steps)]

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for offset in self.offsets:
            terms = []
            for j, h in enumerate(states):
                out = self.edges[offset + j](h, weights[offset + j])
                terms.append(out if edge_weights is None else edge_weights[offset + j] * out)
            states.append(sum(terms))
        return torch.cat(states[-self.multiplier :], dim=1)

    def forward_single(
        self, s0: torch.Tensor, s1: torch.Tensor, edges: Sequence[Edge], concat: Sequence[int]
    ) -> torch.Tensor:
        """Only the genotype's edges and ops: node i sums edges 2i and 2i+1 of `edges`."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i, offset in enumerate(self.offsets):
            (op_a, a), (op_b, b) = edges[2 * i], edges[2 * i + 1]
            states.append(self.edges[offset + a].single(states[a], op_a) + self.edges[offset + b].single(states[b], op_b))
        return torch.cat([states[node] for node in concat], dim=1)


class DartsSupernet(nn.Module):
    """The DARTS search network (see the module docstring); timm's net contract (`num_classes`,
    `num_features`, `forward_features`, `forward_head`, `reset_classifier`).

    Args:
        C: Channels of the first cells (16 in the paper's CIFAR search); doubled at each reduction.
        num_classes: Output classes.
        layers: Number of cells (8 in the paper's search).
        steps: Intermediate nodes per cell (4).
        multiplier: How many of the last nodes form a cell's output (4).
        stem_multiplier: The stem conv has stem_multiplier x C channels (3).
        in_chans: Input channels.
        partial_channels: PC-DARTS's k (1: plain DARTS; 4 in the PC-DARTS paper).
        primitives: The candidate ops (names in `OPS`), the columns of the alphas.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        in_chans: int = 3,
        partial_channels: int = 1,
        primitives: Sequence[str] = PRIMITIVES,
    ):
        super().__init__()
        primitives = tuple(primitives)
        unknown = [p for p in primitives if p not in OPS]
        if unknown or not any(p != "none" for p in primitives):
            raise AutoclsError(
                f"model.net.primitives must name ops of the DARTS space ({', '.join(OPS)}), got {list(primitives)}."
            )
        if partial_channels < 1 or C % partial_channels or (C // partial_channels) % 2:
            raise AutoclsError(
                f"model.net.partial_channels={partial_channels} must divide model.net.C={C} into an even number of "
                "channels per op; use 1 (DARTS) or e.g. 4 with C=16 (PC-DARTS)."
            )
        if not 1 <= multiplier <= steps:
            raise AutoclsError(f"model.net.multiplier={multiplier} must be between 1 and steps={steps}.")
        self.C, self.layers, self.steps, self.multiplier = C, layers, steps, multiplier
        self.partial_channels, self.primitives = partial_channels, primitives
        self.num_classes = num_classes

        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in self.reduction_indices(layers)
            if reduction:
                c_curr *= 2
            cells.append(
                SearchCell(steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, primitives, partial_channels)
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.cells = nn.ModuleList(cells)
        self.num_features = c_prev
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes) if num_classes > 0 else nn.Identity()

        # small random alphas: a near-uniform mixture whose ties are broken by noise (as DARTS)
        shape = (num_edges(steps), len(primitives))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(shape))
        if partial_channels > 1:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(shape[0]))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(shape[0]))
        else:
            self.betas_normal = self.betas_reduce = None

    @staticmethod
    def reduction_indices(layers: int) -> tuple[int, int]:
        """The cells that halve the resolution: at 1/3 and 2/3 of the depth."""
        return layers // 3, 2 * layers // 3

    # --- parameters ----------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """alphas_normal, alphas_reduce (+ betas_normal, betas_reduce with partial channels)."""
        params = [self.alphas_normal, self.alphas_reduce]
        if self.betas_normal is not None:
            params += [self.betas_normal, self.betas_reduce]
        return params

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture ones (convs, BNs, classifier)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def weight_modules(self) -> nn.ModuleDict:
        """The submodules, which hold exactly the weights (the architecture parameters belong to this
        module itself): what `src.optim.optimizers.build_optimizer` should see for the weight optimizer."""
        return nn.ModuleDict(dict(self.named_children()))

    # --- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, genotype: Genotype | None = None) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        if genotype is not None:
            self.check_genotype(genotype)
            for cell in self.cells:
                s0, s1 = s1, cell.forward_single(s0, s1, *genotype.cell(cell.reduction))
            return s1
        # the mixture weights are computed once per forward and shared by all cells of a type
        weights = {
            False: op_weights(self.alphas_normal, steps=self.steps),
            True: op_weights(self.alphas_reduce, steps=self.steps),
        }
        edge_weights = {False: None, True: None}
        if self.betas_normal is not None:
            edge_weights = {False: edge_softmax(self.betas_normal, self.steps), True: edge_softmax(self.betas_reduce, self.steps)}
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights[cell.reduction], edge_weights[cell.reduction])
        return s1

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor, genotype: Genotype | None = None) -> torch.Tensor:
        """The softmax-weighted mixture of all ops, or, with a `genotype`, only its path."""
        return self.forward_head(self.forward_features(x, genotype))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- genotypes -----------------------------------------------------------------------------
    def genotype(self) -> Genotype:
        """The discrete architecture the current architecture parameters stand for."""
        return derive_genotype(
            self.alphas_normal,
            self.alphas_reduce,
            steps=self.steps,
            primitives=self.primitives,
            betas_normal=self.betas_normal,
            betas_reduce=self.betas_reduce,
            multiplier=self.multiplier,
        )

    def check_genotype(self, genotype: Genotype) -> None:
        """One sentence when `genotype` does not fit this supernet (node count, output width, ops)."""
        for reduction in (False, True):
            edges, concat = genotype.cell(reduction)
            kind = "reduce" if reduction else "normal"
            problem = None
            if len(edges) != 2 * self.steps:
                problem = f"its {kind} cell has {len(edges) // 2} nodes but the supernet has steps={self.steps}"
            elif len(concat) != self.multiplier:
                problem = f"its {kind} cell concatenates {len(concat)} nodes but the supernet's multiplier is {self.multiplier}"
            else:
                missing = sorted({op for op, _ in edges} - set(self.primitives))
                if missing:
                    problem = f"its {kind} cell uses {', '.join(missing)}, which the supernet's primitives lack"
            if problem:
                raise AutoclsError(f"The genotype does not fit the supernet: {problem}; sample genotypes from the same space.")
