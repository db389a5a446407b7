"""The sweeper's search-space syntax against examples, and the one-sentence errors for bad input."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from src.hpo.search_space import parse_search_space
from src.hpo.storage import open_storage, storage_spec
from src.utils.errors import AutoclsError


def test_params_map_to_optuna_distributions():
    params = OmegaConf.create({
        "optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
        "optimizer.weight_decay": "interval(0, 1e-3)",
        "data.batch_size": "choice(32, 64, 128)",
        "model.net.width": "range(16, 65, 16)",
        "model.net.depth": "int(interval(2, 6))",
        "model.net.blocks": "tag(int, log, interval(1, 64))",
        "scheduler.min_lr_ratio": "range(0.0, 0.3, 0.1)",
        "optimizer": "sgd,adamw",
        "loss.label_smoothing": [0.0, 0.1],
        "model.net.dropout": "choice(true, false)",
        "trainer.max_epochs": 5,
        "data.name": "digits",
    })
    space = parse_search_space(params)
    d = space.distributions
    assert d["optimizer.lr"] == FloatDistribution(1e-4, 0.1, log=True)
    assert d["optimizer.weight_decay"] == FloatDistribution(0.0, 1e-3)
    assert d["data.batch_size"] == CategoricalDistribution([32, 64, 128])
    # Hydra's range excludes the stop: 16, 32, 48, 64
    assert d["model.net.width"] == IntDistribution(16, 64, step=16)
    assert d["model.net.depth"] == IntDistribution(2, 6)
    assert d["model.net.blocks"] == IntDistribution(1, 64, log=True)
    assert d["scheduler.min_lr_ratio"] == FloatDistribution(0.0, 0.2, step=0.1)
    assert d["optimizer"] == CategoricalDistribution(["sgd", "adamw"])
    assert d["loss.label_smoothing"] == CategoricalDistribution([0.0, 0.1])
    assert d["model.net.dropout"] == CategoricalDistribution([True, False])
    assert space.fixed == ["trainer.max_epochs=5", "data.name=digits"]
    overrides = space.overrides({"optimizer.lr": 0.01, "model.net.dropout": True, "optimizer": "sgd"})
    assert overrides == ["trainer.max_epochs=5", "data.name=digits", "optimizer.lr=0.01",
                         "model.net.dropout=true", "optimizer=sgd"]


def test_command_line_sweeps_join_and_replace_the_space():
    space = parse_search_space({"optimizer.lr": "interval(0.1, 1)", "model.net.width": "choice(8, 16)"},
                               ["hparams_search=digits_tpe", "optimizer.lr=choice(0.01,0.02)", "model.net.width=32"])
    assert space.distributions == {"optimizer.lr": CategoricalDistribution([0.01, 0.02])}
    assert space.fixed == ["hparams_search=digits_tpe", "model.net.width=32"]


def test_choices_of_lists_pass_to_hydra_verbatim():
    space = parse_search_space({"model.net.channels": "choice([16,32],[32,64])"})
    assert space.distributions["model.net.channels"] == CategoricalDistribution(["[16,32]", "[32,64]"])
    assert space.overrides({"model.net.channels": "[32,64]"}) == ["model.net.channels=[32,64]"]


def test_grid_lists_every_value_and_refuses_intervals():
    space = parse_search_space({"a": "choice(1, 2)", "b": "range(0.0, 0.3, 0.1)", "c": "range(1, 4)"})
    assert space.grid() == {"a": [1, 2], "b": [0.0, 0.1, 0.2], "c": [1, 2, 3]}
    assert space.grid_size() == 18
    with pytest.raises(AutoclsError, match=r"Grid search needs a finite set of values.*optimizer.lr"):
        parse_search_space({"optimizer.lr": "interval(0.1, 1)"}).grid()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("interval(1e-4", r"^Cannot parse the search space 'interval\(1e-4' of optimizer.lr \(.*\); write it as choice"),
        ("choice(1, 2", r"^Cannot parse the search space 'choice\(1, 2' of optimizer.lr"),
        ("tag(log, choice(1, 2))", r"tag\(log, \.\.\.\) applies to interval\(\.\.\.\) only"),
        ("tag(log, interval(0, 1))", r"a log interval needs a positive lower bound"),
        ("tag(exp, interval(1, 2))", r"the sweeper knows only tag\(log"),
        ("interval(2, 1)", r"is empty; write interval\(low, high\) with low < high"),
    ],
)
def test_malformed_search_space_is_one_sentence(value, message):
    with pytest.raises(AutoclsError, match=message) as err:
        parse_search_space({"optimizer.lr": value})
    assert "\n" not in str(err.value)


def test_storage_spec_defaults_to_a_journal_in_the_sweep_dir(tmp_path):
    assert storage_spec(None, tmp_path) == str(tmp_path.resolve() / "optuna.journal")
    assert storage_spec("sqlite", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    assert storage_spec("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


@pytest.mark.parametrize("url", ["sqlite:////nonexistent_dir_autocls/sub/study.db", "nosuchdialect://host/db",
                                 "/proc/autocls_no_such_dir/optuna.journal"])
def test_storage_that_cannot_be_opened_is_one_sentence(url):
    with pytest.raises(AutoclsError, match=r"^Cannot open the Optuna storage '.*' \(.*\); set hydra.sweeper.storage") \
            as err:
        open_storage(url)
    assert "\n" not in str(err.value)
