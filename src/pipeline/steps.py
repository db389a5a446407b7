"""The steps of a pipeline as its config describes them, checked before anything runs.

A pipeline config (configs/pipeline/<name>.yaml) lists its steps in order:

    steps:
      search:                                  # the step's name: ${steps.search.<output>} later on
        kind: train                            # train | sweep | pba (src/pipeline/kinds.py)
        overrides: [experiment=digits_darts]   # the command line of the run
        outputs: {genotype: genotype.json}     # files the run must leave, relative to its directory
      train:
        kind: train
        overrides:
          - model.net.genotype=${steps.search.genotype}   # an earlier step's output
          - ${steps.hpo.best_overrides}                  # a list output is spliced in

Overrides resolve only when their step is about to run, once the steps before it have finished, so
`${steps.<name>.<output>}` always means an earlier step's real output. Before the first step runs,
`plan` resolves every step against the outputs each step will have (known paths, empty values where
only the run can tell) and composes each step's train.py config, so a typo in the last step fails in
one sentence before hours of search, not after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from src.pipeline.kinds import KINDS, ROOT, StepKind
from src.utils.errors import AutoclsError

STEP_KEYS = ("kind", "overrides", "outputs", "args", "metric")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# what a Hydra override value can hold unquoted: the step directories go into overrides as they are
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./\-+:@~]+")


@dataclass
class Step:
    name: str
    index: int  # 1-based position in the pipeline
    kind: StepKind
    dir: Path
    overrides_node: Any  # the step's `overrides` list, interpolations unresolved
    declared_outputs: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None

    @property
    def marker(self) -> Path:
        """`step.json`: written when the step has finished; a rerun skips a step that has it."""
        return self.dir / "step.json"

    @property
    def log(self) -> Path:
        return self.dir / "step.log"

    def planned_outputs(self) -> dict[str, Any]:
        return {**self.kind.planned_outputs(self), **{k: str(self.dir / v) for k, v in self.declared_outputs.items()}}

    def declared_files(self) -> dict[str, str]:
        """The declared outputs of a finished run, checked: each file must be there."""
        files = {}
        for key, relative in self.declared_outputs.items():
            path = self.dir / relative
            if not path.exists():
                raise AutoclsError(
                    f"Step '{self.name}' finished but {self.dir} holds no {relative} (its output '{key}'); make its "
                    f"overrides select a run that writes it (or fix outputs.{key}), then delete {self.dir} and rerun."
                )
            files[key] = str(path)
        return files


def plan(cfg: DictConfig, check_compose: bool = True) -> list[Step]:
    """The pipeline's steps, checked: known kinds and keys, references to earlier steps' outputs only,
    and (with `check_compose`) every step's overrides composing a train.py config."""
    if not cfg.pipeline.get("name"):
        raise AutoclsError("The pipeline config has no name; set name: <name> in it (it names the pipeline's folder).")
    try:
        pipeline_dir = Path(str(cfg.pipeline_dir)).expanduser().resolve()
    except OmegaConfBaseException as exc:
        raise AutoclsError(f"pipeline_dir does not resolve ({str(exc).splitlines()[0]}); set pipeline_dir=<folder>.") from exc
    if not _PLAIN_PATH.fullmatch(str(pipeline_dir)):
        raise AutoclsError(f"pipeline_dir {pipeline_dir} has characters that Hydra overrides cannot carry unquoted "
                           "(spaces, quotes, brackets, commas); pick a folder named with letters, digits, / . _ - only.")
    specs = cfg.pipeline.get("steps")
    if not isinstance(specs, DictConfig) or not specs:
        raise AutoclsError(f"Pipeline '{cfg.pipeline.get('name')}' has no steps; give pipeline.steps as a mapping "
                           "<name>: {kind: train|sweep|pba, overrides: [...]} in its config.")
    steps = [_step(name, index, spec, pipeline_dir) for index, (name, spec) in enumerate(specs.items(), 1)]
    set_outputs(cfg, {})
    try:
        for step in steps:
            overrides = resolve_overrides(cfg, step)
            if check_compose:
                check_composes(step, overrides)
            set_outputs(cfg, {**cfg.steps, step.name: step.planned_outputs()})
    finally:
        set_outputs(cfg, {})
    return steps


def _step(name: str, index: int, spec: Any, pipeline_dir: Path) -> Step:
    if not _NAME.fullmatch(str(name)):
        raise AutoclsError(f"Step name '{name}' is not a plain identifier; name steps with letters, digits and _ so "
                           "that ${steps.<name>.<output>} can refer to them.")
    if not isinstance(spec, DictConfig):
        raise AutoclsError(f"Step '{name}' is {spec!r}; give it as a mapping {{kind: ..., overrides: [...]}}.")
    unknown = sorted(set(spec) - set(STEP_KEYS))
    if unknown:
        raise AutoclsError(f"Step '{name}' has the unknown key(s) {', '.join(map(str, unknown))}; a step takes "
                           f"{', '.join(STEP_KEYS)}.")
    kind_name = spec.get("kind")
    if kind_name not in KINDS:
        raise AutoclsError(f"Step '{name}' has kind '{kind_name}'; set its kind to one of {', '.join(KINDS)}.")
    kind = KINDS[kind_name]
    args = OmegaConf.to_container(spec.args, resolve=True) if spec.get("args") is not None else {}
    if args and not kind.takes_args:
        raise AutoclsError(f"Step '{name}' of kind {kind_name} has args; only pba steps take args (the options of "
                           "scripts/pba_search.py), put train.py settings into its overrides.")
    if spec.get("metric") is not None and kind is not KINDS["train"]:
        raise AutoclsError(f"Step '{name}' of kind {kind_name} has a metric; only train steps take one (a sweep "
                           "reports its optimized_metric, a PBA search its --metric).")
    outputs = OmegaConf.to_container(spec.outputs, resolve=True) if spec.get("outputs") is not None else {}
    taken = set(outputs) & set(kind.outputs)
    if taken:
        raise AutoclsError(f"Step '{name}' declares the output(s) {', '.join(sorted(taken))}, which every {kind_name} "
                           "step gives already; name its files differently.")
    overrides = spec.get("overrides") if spec.get("overrides") is not None else []
    if not isinstance(overrides, ListConfig):
        raise AutoclsError(f"Step '{name}' has overrides that are not a list; write them as a YAML list of "
                           "key=value strings.")
    return Step(name=str(name), index=index, kind=kind, dir=pipeline_dir / f"{index:02d}_{name}",
                overrides_node=overrides, declared_outputs={str(k): str(v) for k, v in outputs.items()}, args=args,
                metric=spec.get("metric"))


def set_outputs(cfg: DictConfig, outputs: dict[str, dict]) -> None:
    """What `${steps.<name>.<output>}` refers to: the outputs of the steps finished so far."""
    with open_dict(cfg):
        cfg.steps = OmegaConf.create(
            {k: OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for k, v in outputs.items()}
        )


def resolve_overrides(cfg: DictConfig, step: Step) -> list[str]:
    """The step's overrides now, then the pipeline's `every_step` list and the command line's: each entry
    a `key=value` string, or a list of them (a list output such as best_overrides) spliced in place."""
    lists = [("overrides", step.overrides_node), ("pipeline.every_step", cfg.pipeline.get("every_step")),
             ("every_step", cfg.get("every_step"))]
    resolved: list[str] = []
    for where, node in lists:
        if node is None:
            continue
        if not isinstance(node, ListConfig):
            raise AutoclsError(f"{where} of step '{step.name}' is {node!r}, not a list; write it as a list of "
                               "key=value strings, e.g. every_step=['logger=none','trainer.max_epochs=2'].")
        try:
            items = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as exc:
            earlier = ", ".join(f"{name}.{{{','.join(out)}}}" for name, out in cfg.steps.items()) or "none"
            reason = str(exc).strip().splitlines()[0]
            raise AutoclsError(
                f"Step '{step.name}' cannot resolve its {where} ({reason}); a step can use only the outputs of the "
                f"steps before it (here: {earlier})."
            ) from exc
        for item in items:
            for entry in item if isinstance(item, list) else [item]:
                if isinstance(entry, (dict, list)) or entry is None:
                    raise AutoclsError(
                        f"Step '{step.name}' has {entry!r} among its {where}; every entry must be a key=value "
                        "string or a list of them (splice ${steps.<name>.best_overrides}, not best_params)."
                    )
                resolved.append(str(entry))
    return resolved


def check_composes(step: Step, overrides: list[str]) -> None:
    """Compose configs/train.yaml with the step's train.py overrides (sweep ranges left to the sweeper)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    plain = []
    for text in step.kind.train_overrides(overrides):
        try:
            if parser.parse_override(text).is_sweep_override():
                continue
        except Exception as exc:  # Hydra's grammar errors
            raise AutoclsError(f"Step '{step.name}' has the override '{text}', which Hydra cannot parse "
                               f"({str(exc).strip().splitlines()[0]}); fix it in the pipeline config.") from exc
        plain.append(text)
    try:
        if GlobalHydra.instance().is_initialized():  # inside pipeline.py: Hydra knows configs/ already
            compose("train", overrides=plain, return_hydra_config=True)
        else:
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                compose("train", overrides=plain, return_hydra_config=True)
    except Exception as exc:  # Hydra's composition errors: unknown keys, groups, options
        reason = str(exc).strip().splitlines()[0]
        raise AutoclsError(f"Step '{step.name}' does not compose a train.py config ({reason}); fix its overrides "
                           "in the pipeline config or on the command line.") from exc
