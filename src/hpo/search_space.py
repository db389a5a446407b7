"""The sweeper's search space: hydra-optuna-sweeper's `params:` syntax, parsed by Hydra's own override parser.

    optimizer.lr: tag(log, interval(1e-4, 1e-1))   -> FloatDistribution(1e-4, 0.1, log=True)
    optimizer.weight_decay: interval(0, 1e-3)       -> FloatDistribution(0, 1e-3)
    data.batch_size: choice(32, 64, 128)            -> CategoricalDistribution
    model.net.width: range(16, 65, 16)              -> IntDistribution(16, 64, step=16)  (16, 32, 48, 64)
    model.net.depth: int(interval(2, 6))            -> IntDistribution(2, 6)  (also tag(int, interval(...)))
    optimizer: sgd,adamw                            -> CategoricalDistribution (a config group choice)
    loss.label_smoothing: [0.0, 0.1]                -> a YAML list is a choice among its items
    trainer.max_epochs: 5                           -> not swept: the same override for every trial

`range` follows Python and Hydra's basic sweeper: the stop is excluded (hydra-optuna-sweeper included
it). Choices that are not plain scalars (lists, dicts) become categories named by their override text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from src.utils.errors import AutoclsError

SYNTAX = "choice(a, b), range(start, stop, step), interval(low, high), tag(log, interval(low, high)) or a list"
_TAGS = {"log", "int"}


@dataclass
class SearchSpace:
    """Optuna distributions by override key, plus the overrides every trial gets unchanged."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    # keys whose categories are override texts (lists, dicts), passed to Hydra verbatim
    verbatim: set[str] = field(default_factory=set)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The Hydra overrides of one trial: the fixed ones, then `key=value` for each sampled value."""
        swept = [f"{k}={v if k in self.verbatim else value_text(v)}" for k, v in params.items()]
        return [*self.fixed, *swept]

    def grid(self) -> dict[str, list]:
        """Every value of every dimension, for grid search; intervals have no finite grid."""
        grid = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                n = round((dist.high - dist.low) / dist.step) + 1
                grid[key] = [round(dist.low + i * dist.step, 12) for i in range(n)]
            else:
                raise AutoclsError(
                    f"Grid search needs a finite set of values, but hydra.sweeper.params.{key} is {dist}; "
                    "write it as choice(...) or range(...)."
                )
        return grid

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size


def parse_search_space(params: Mapping[str, Any] | None, arguments: list[str] = ()) -> SearchSpace:
    """`params` from the sweeper config, then the command line's own overrides: a sweep there
    (`optimizer.lr=interval(1e-3,1e-1)`, `model.net.width=16,32`) joins or replaces the space, a plain
    override is fixed for every trial."""
    space = SearchSpace()
    texts = [_param_text(key, value) for key, value in (params or {}).items()]
    for text in [*texts, *arguments]:
        override = _parse(text)
        key = override.get_key_element()
        space.distributions.pop(key, None)
        space.verbatim.discard(key)
        space.fixed = [f for f in space.fixed if _parse(f).get_key_element() != key]
        if not override.is_sweep_override():
            space.fixed.append(text)
            continue
        space.distributions[key] = _distribution(override, key)
        if isinstance(space.distributions[key], CategoricalDistribution) and _needs_verbatim(override):
            space.verbatim.add(key)
    return space


def value_text(value: Any) -> str:
    """A sampled value as Hydra override text (`true`, `null`, escaped strings)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return Override._get_value_element_as_str(value)


def _param_text(key: str, value: Any) -> str:
    if isinstance(value, (ListConfig, list, tuple)):
        items = OmegaConf.to_container(value) if isinstance(value, ListConfig) else list(value)
        if not items:
            raise AutoclsError(f"hydra.sweeper.params.{key} is an empty list; give at least one value to choose from.")
        return f"{key}=choice({','.join(value_text(v) for v in items)})"
    if isinstance(value, (DictConfig, dict)):
        raise AutoclsError(f"hydra.sweeper.params.{key} is a mapping; write its search space as {SYNTAX}.")
    return f"{key}={value_text(value) if not isinstance(value, str) else value}"


def _parse(text: str) -> Override:
    try:
        return OverridesParser.create().parse_override(text)
    except Exception as exc:  # Hydra's grammar errors (OverrideParseException, HydraException)
        key, _, value = text.partition("=")
        reason = str(exc).splitlines()[0]
        raise AutoclsError(
            f"Cannot parse the search space '{value}' of {key} ({reason}); write it as {SYNTAX}."
        ) from exc


def _distribution(override: Override, key: str) -> BaseDistribution:
    sweep = override.value()
    tags = set(getattr(sweep, "tags", set()) or set())
    unknown = tags - _TAGS
    if unknown:
        raise AutoclsError(f"{key} has the tag(s) {sorted(unknown)}; the sweeper knows only tag(log, ...) and tag(int, ...).")
    log = "log" in tags
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low >= high:
            raise AutoclsError(f"{key}: interval({low}, {high}) is empty; write interval(low, high) with low < high.")
        if log and low <= 0:
            raise AutoclsError(f"{key}: a log interval needs a positive lower bound, got {low}.")
        if "int" in tags or (isinstance(low, int) and isinstance(high, int)):
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if log:
        raise AutoclsError(f"{key}: tag(log, ...) applies to interval(...) only; use tag(log, interval(low, high)).")
    if isinstance(sweep, RangeSweep) and not sweep.shuffle:
        values = list(override.sweep_iterator())  # Hydra's own expansion: the stop is excluded
        if not values:
            raise AutoclsError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) holds no value.")
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            return IntDistribution(values[0], values[-1], step=sweep.step) if len(values) > 1 else \
                CategoricalDistribution(values)
        step = float(sweep.step)
        return FloatDistribution(float(sweep.start), float(sweep.start) + step * (len(values) - 1), step=step) \
            if len(values) > 1 else CategoricalDistribution([float(values[0])])
    if isinstance(sweep, (ChoiceSweep, RangeSweep)):
        values = list(override.sweep_iterator())
        if _needs_verbatim(override):
            values = list(override.sweep_string_iterator())
        return CategoricalDistribution(_unique(values))
    raise AutoclsError(f"{key}: {override.input_line!r} is not a search space Optuna can sample; write it as {SYNTAX}.")


def _needs_verbatim(override: Override) -> bool:
    return any(not (v is None or isinstance(v, (bool, int, float, str))) for v in override.sweep_iterator())


def _unique(values: list) -> list:
    seen = []
    for v in values:
        if not any(v == s and type(v) is type(s) for s in seen):
            seen.append(v)
    return seen
