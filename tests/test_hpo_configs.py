"""Every configs/hparams_search/*.yaml composes, names a sampler and pruner Optuna can build, and every
key of its search space exists in the trial config it overrides."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import OmegaConf

import hydra_plugins.autocls_optuna_sweeper.optuna_sweeper  # noqa: F401 - registers the sweeper configs
from hydra_plugins.autocls_optuna_sweeper._core import _accepted, _arguments
from src.hpo.search_space import parse_search_space

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEARCHES = sorted(p.stem for p in (CONFIGS / "hparams_search").glob("*.yaml"))


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train.yaml", overrides=overrides, return_hydra_config=True)


def test_the_documented_searches_exist():
    assert {"digits_tpe", "cifar10_tpe", "cifar10_asha", "cifar10_bohb", "transfer_grid", "transfer_tpe",
            "cifar10_latency_mo", "cifar10_prune_mo", "digits_prune_mo"} <= set(SEARCHES)


@pytest.mark.parametrize("name", SEARCHES)
def test_search_config_composes_and_its_trials_compose(name):
    cfg = _compose([f"hparams_search={name}", "paths.output_dir=/tmp/unused"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("AutoclsOptunaSweeper")
    assert sweeper.study_name == name
    objectives = OmegaConf.to_container(cfg.optimized_metric) if OmegaConf.is_list(cfg.optimized_metric) \
        else [cfg.optimized_metric]
    directions = OmegaConf.to_container(sweeper.direction) if OmegaConf.is_list(sweeper.direction) \
        else [sweeper.direction]
    assert len(objectives) == len(directions)
    space = parse_search_space(sweeper.params)
    assert space.distributions
    # sampler and pruner build as the sweeper builds them (the grid sampler gets the space's grid)
    for node in (sweeper.sampler, sweeper.pruner):
        if node is not None:
            cls = get_class(node._target_)
            extra = {"search_space": space.grid()} if issubclass(cls, optuna.samplers.GridSampler) else {}
            assert cls(**_accepted(cls, _arguments(node), "node"), **extra)
    if "Grid" in sweeper.sampler._target_:
        assert space.grid_size() > 1
    # one trial: the first value of every dimension
    sample = {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.distributions.items()}
    trial = _compose([f"hparams_search={name}", "paths.output_dir=/tmp/unused", *space.overrides(sample)])
    for key, value in sample.items():
        assert OmegaConf.select(trial, key) == pytest.approx(value)
    if len(objectives) == 1:  # single objective: per-epoch reports for pruning and learning curves
        assert trial.callbacks.optuna_pruning.monitor == "val/acc"


@pytest.mark.parametrize("group", ["sampler", "pruner"])
def test_every_sampler_and_pruner_option_builds(group):
    """tpe, random, grid, cmaes, qmc, nsgaii; none, median, asha, hyperband: each a working Optuna object."""
    from hydra.core.config_store import ConfigStore

    options = ConfigStore.instance().list(f"hydra/sweeper/{group}")
    names = {o.removesuffix(".yaml") for o in options}
    expected = {"sampler": {"tpe", "random", "grid", "cmaes", "qmc", "nsgaii"},
                "pruner": {"none", "median", "asha", "hyperband"}}[group]
    assert names == expected
    base = {"sampler": optuna.samplers.BaseSampler, "pruner": optuna.pruners.BasePruner}[group]
    for name in names:
        node = OmegaConf.create(ConfigStore.instance().load(f"hydra/sweeper/{group}/{name}.yaml").node)
        cls = get_class(node._target_)
        extra = {"search_space": {"x": [1, 2]}} if issubclass(cls, optuna.samplers.GridSampler) else {}
        built = cls(**_accepted(cls, _arguments(node), name), **extra)
        assert isinstance(built, base)
