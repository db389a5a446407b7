"""BackboneNAS's search space: ResNet-style backbones encoded as stages of basic blocks.

An encoding lists the stages in order; each stage has a number of blocks, a width (channels) and
whether its first block halves the resolution. Its string form is one `<blocks>x<width>` per stage,
`s2` marking a downsampling stage, joined by `-`:

    "2x32-3x64s2-2x128s2"   = 2 blocks of 32 channels, 3 of 64 (halving), 2 of 128 (halving)

(after Vega's BackboneNas, whose encodings also place the channel doublings and downsamplings of a
ResNet). `BackboneSpace` samples, mutates and crosses encodings (the operators that
`src.nas.evolution` drives) and decodes them into `src.models.encoded_resnet.EncodedResNet`, a
network with timm's contract. It is what a BackboneNAS config gives as `model.net`: the family of
networks searched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from src.utils.errors import AutoclsError

_STAGE = re.compile(r"^(\d+)x(\d+)(s2)?$")
EXAMPLE = "2x32-3x64s2-2x128s2"


@dataclass(frozen=True)
class Stage:
    blocks: int
    width: int
    downsample: bool = False

    def to_string(self) -> str:
        return f"{self.blocks}x{self.width}{'s2' if self.downsample else ''}"


@dataclass(frozen=True)
class BackboneEncoding:
    """The stages of a ResNet-style backbone (hashable, compares by value)."""

    stages: tuple[Stage, ...]

    def to_string(self) -> str:
        return "-".join(stage.to_string() for stage in self.stages)

    def __str__(self) -> str:
        return self.to_string()

    @property
    def downsamples(self) -> int:
        return sum(stage.downsample for stage in self.stages)

    @classmethod
    def parse(cls, text: str | BackboneEncoding) -> BackboneEncoding:
        """The encoding of a string like "2x32-3x64s2-2x128s2"; one sentence when it is malformed."""
        if isinstance(text, BackboneEncoding):
            return text
        parts = str(text).strip().split("-")
        stages = []
        for part in parts:
            match = _STAGE.match(part.strip())
            if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
                raise AutoclsError(
                    f"Invalid backbone encoding {text!r}: stage {part!r} is not <blocks>x<width> with an optional s2 "
                    f"(blocks and width >= 1); write stages like {EXAMPLE!r}."
                )
            stages.append(Stage(int(match.group(1)), int(match.group(2)), match.group(3) is not None))
        return cls(tuple(stages))


@dataclass(frozen=True)
class BackboneSpace:
    """All encodings with `num_stages` stages, blocks from `depths`, widths from `widths`, and at most
    `max_downsamples` (at least `min_downsamples`) downsampling stages.

    `decode` builds the network; `num_classes`, `in_chans`, `stem_width` and `shortcut` are passed to
    it (they are the same for every member).

    Args:
        num_stages: Stages per backbone.
        depths: Choices of blocks per stage.
        widths: Choices of channels per stage.
        min_downsamples, max_downsamples: Bounds on the downsampling stages (each halves H and W:
            2 to 3 suit 32-pixel inputs).
        stem_width: Channels of the 3x3 stem conv.
        shortcut: "B" (1x1 conv projection where shapes change; the only choice, since searched
            widths may shrink, which the parameter-free "A" cannot do).
        num_classes, in_chans: Of the decoded networks.
    """

    num_stages: int = 3
    depths: tuple[int, ...] = (1, 2, 3, 4)
    widths: tuple[int, ...] = (16, 32, 48, 64, 96, 128)
    min_downsamples: int = 1
    max_downsamples: int = 2
    stem_width: int = 16
    shortcut: str = "B"
    num_classes: int = 10
    in_chans: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(sorted(int(d) for d in self.depths)))
        object.__setattr__(self, "widths", tuple(sorted(int(w) for w in self.widths)))
        if self.num_stages < 1 or not self.depths or not self.widths or min(self.depths) < 1 or min(self.widths) < 1:
            raise AutoclsError("model.net needs num_stages >= 1 and non-empty depths and widths of positive integers.")
        if not 0 <= self.min_downsamples <= self.max_downsamples <= self.num_stages:
            raise AutoclsError(
                f"model.net.min_downsamples={self.min_downsamples} and max_downsamples={self.max_downsamples} must satisfy "
                f"0 <= min <= max <= num_stages={self.num_stages}."
            )
        if self.shortcut != "B":
            # widths are searched freely, so a stage may be narrower than the one before it, which
            # only a projection shortcut can map to
            raise AutoclsError(f"model.net.shortcut={self.shortcut}: the backbone search needs shortcut=B (1x1 projections).")

    # --- members -------------------------------------------------------------------------------
    def contains(self, encoding: BackboneEncoding) -> bool:
        return (
            len(encoding.stages) == self.num_stages
            and all(s.blocks in self.depths and s.width in self.widths for s in encoding.stages)
            and self.min_downsamples <= encoding.downsamples <= self.max_downsamples
        )

    def check(self, encoding: BackboneEncoding | str) -> BackboneEncoding:
        """The parsed encoding, or one sentence saying why it is not in this space."""
        encoding = BackboneEncoding.parse(encoding)
        if not self.contains(encoding):
            raise AutoclsError(
                f"Backbone encoding {encoding} is not in the search space ({self.num_stages} stages, blocks in "
                f"{list(self.depths)}, widths in {list(self.widths)}, {self.min_downsamples} to {self.max_downsamples} "
                "downsampling stages); pick one inside it or widen the space."
            )
        return encoding

    def canonical(self, encoding: BackboneEncoding) -> BackboneEncoding:
        return encoding

    def to_string(self, encoding: BackboneEncoding) -> str:
        return encoding.to_string()

    def from_string(self, text: str) -> BackboneEncoding:
        return self.check(text)

    def size(self) -> int:
        patterns = sum(1 for flags in product((False, True), repeat=self.num_stages) if self._downsamples_ok(flags))
        return (len(self.depths) * len(self.widths)) ** self.num_stages * patterns

    def _downsamples_ok(self, flags: Sequence[bool]) -> bool:
        return self.min_downsamples <= sum(flags) <= self.max_downsamples

    def cheapest(self) -> list[BackboneEncoding]:
        """The members with the fewest blocks and the narrowest widths, one per admissible
        downsampling pattern: every cost (parameters, latency) is lowest among these."""
        out = []
        for flags in product((False, True), repeat=self.num_stages):
            if self._downsamples_ok(flags):
                out.append(BackboneEncoding(tuple(Stage(self.depths[0], self.widths[0], f) for f in flags)))
        return out

    # --- operators -----------------------------------------------------------------------------
    def _fix_downsamples(self, flags: list[bool], rng: np.random.Generator) -> list[bool]:
        """Clear or set random flags until the count is within the bounds."""
        while sum(flags) > self.max_downsamples:
            on = [i for i, f in enumerate(flags) if f]
            flags[on[int(rng.integers(len(on)))]] = False
        while sum(flags) < self.min_downsamples:
            off = [i for i, f in enumerate(flags) if not f]
            flags[off[int(rng.integers(len(off)))]] = True
        return flags

    def sample(self, rng: np.random.Generator) -> BackboneEncoding:
        """Uniform depths and widths; a uniformly random admissible downsampling pattern."""
        patterns = [f for f in product((False, True), repeat=self.num_stages) if self._downsamples_ok(f)]
        flags = patterns[int(rng.integers(len(patterns)))]
        return BackboneEncoding(
            tuple(
                Stage(self.depths[int(rng.integers(len(self.depths)))], self.widths[int(rng.integers(len(self.widths)))], f)
                for f in flags
            )
        )

    def mutate(self, encoding: BackboneEncoding, rng: np.random.Generator) -> BackboneEncoding:
        """One local change: a stage one depth or width choice deeper/shallower, wider/narrower, or one
        downsampling moved to another stage (or added/removed within the bounds)."""
        stages = list(encoding.stages)
        for _ in range(100):  # a move may be impossible (e.g. one depth choice only); try another
            i = int(rng.integers(len(stages)))
            stage = stages[i]
            kind = int(rng.integers(3))
            if kind == 0:
                new = self._neighbour(self.depths, stage.blocks, rng)
                candidate = Stage(new, stage.width, stage.downsample) if new is not None else None
            elif kind == 1:
                new = self._neighbour(self.widths, stage.width, rng)
                candidate = Stage(stage.blocks, new, stage.downsample) if new is not None else None
            else:
                flags = [s.downsample for s in stages]
                flags[i] = not flags[i]
                if not self._downsamples_ok(flags):
                    # keep the count: move the flag to another stage instead
                    others = [j for j, f in enumerate(flags) if j != i and f == flags[i]]
                    if not others:
                        continue
                    flags[others[int(rng.integers(len(others)))]] = not flags[i]
                mutated = BackboneEncoding(tuple(Stage(s.blocks, s.width, f) for s, f in zip(stages, flags)))
                if mutated != encoding:
                    return mutated
                continue
            if candidate is not None:
                stages[i] = candidate
                return BackboneEncoding(tuple(stages))
        return encoding

    @staticmethod
    def _neighbour(choices: tuple[int, ...], value: int, rng: np.random.Generator) -> int | None:
        index = choices.index(value) if value in choices else int(np.searchsorted(choices, value).clip(0, len(choices) - 1))
        near = [j for j in (index - 1, index + 1) if 0 <= j < len(choices) and choices[j] != value]
        return choices[near[int(rng.integers(len(near)))]] if near else None

    def crossover(self, a: BackboneEncoding, b: BackboneEncoding, rng: np.random.Generator) -> BackboneEncoding:
        """Uniform crossover by stage; the downsampling count is repaired if the mix breaks its bounds."""
        take_b = rng.random(self.num_stages) < 0.5
        stages = [sb if t else sa for sa, sb, t in zip(a.stages, b.stages, take_b)]
        flags = self._fix_downsamples([s.downsample for s in stages], rng)
        return BackboneEncoding(tuple(Stage(s.blocks, s.width, f) for s, f in zip(stages, flags)))

    # --- networks ------------------------------------------------------------------------------
    def decode(self, encoding: BackboneEncoding | str, **kwargs):
        """The network of an encoding (an `EncodedResNet`); keyword arguments override the space's
        network settings (e.g. `drop_rate`)."""
        from src.models.encoded_resnet import EncodedResNet

        settings = {
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "stem_width": self.stem_width,
            "shortcut": self.shortcut,
            **kwargs,
        }
        return EncodedResNet(self.check(encoding), **settings)
