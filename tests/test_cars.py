"""CARS (src/lit_models/cars_search.py) on tiny digits runs: evolution keeps a valid, feasible
population, writes its fronts, resumes exactly; training a front member; one-sentence errors."""

from __future__ import annotations

import csv
import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from src.nas.evolution import DartsSpace, random_genotype
from src.nas.front import front_member_net, load_front, pick_member, write_json
from src.nas.genotypes import Genotype
from src.utils.errors import AutoclsError

# a 3-cell, 4-channel supernet with 2 nodes per cell; costs of the same tiny network
TINY = [
    "experiment=digits_cars",
    "logger=none",
    "model.net.C=4",
    "model.net.layers=3",
    "model.net.steps=2",
    "model.net.multiplier=2",
    "model.cost_net.C=4",
    "model.cost_net.layers=3",
    "model.population_size=4",
    "model.warmup_epochs=2",
    "data.batch_size=32",
    "+data.eval_batch_size=128",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "test=false",
]


def _train(compose_train, out: Path, extra=()):
    from src.train import train

    return train(compose_train([*TINY, *extra], out=out))


def _population(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["cars"]


def test_cars_search_evolves_writes_fronts_and_resumes_exactly(compose_train, tmp_path):
    # uninterrupted: 3 epochs of which 2 warm up with random paths; selection starts at the end of the
    # last warm-up epoch, so epoch 0 only evaluates the population and epochs 1 and 2 evolve it
    full = tmp_path / "full"
    metrics = _train(compose_train, full, ["trainer.max_epochs=3", "callbacks.model_checkpoint.save_top_k=-1"])
    assert 0 <= metrics["val/acc"] <= 1 and metrics["search/evaluated"] == 8  # 4 members + 4 offspring
    cars = full / "cars"
    for epoch in range(3):
        assert (cars / f"front_{epoch:03d}.png").stat().st_size > 0
        with open(cars / f"population_{epoch:03d}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == (4 if epoch == 0 else 8)
        assert sum(r["selected"] == "True" for r in rows) == 4
    front = load_front(cars / "pareto_front.json")
    space = DartsSpace(steps=2)
    members = [space.from_string(r["member"]) for r in front]
    assert all(space.contains(g) for g in members)
    # the front is non-dominated: sorted by params, accuracy strictly rises
    params = [r["params_m"] for r in front]
    accs = [r["val_acc"] for r in front]
    assert params == sorted(params) and all(b > a for a, b in pairwise(accs))

    # resumed from the checkpoint after epoch 1 (same schedule): the same population, accuracies and
    # generator at the end as without the interruption
    after_epoch_1 = full / "checkpoints" / "epoch_001.ckpt"
    state = _population(after_epoch_1)
    assert len(state["population"]) == 4 and "params" in state["tables"]
    resumed = tmp_path / "resumed"
    _train(compose_train, resumed, ["trainer.max_epochs=3", f"ckpt_path={after_epoch_1}", "callbacks.model_checkpoint.save_top_k=-1"])
    expected, got = (_population(run / "checkpoints" / "epoch_002.ckpt") for run in (full, resumed))
    assert got["population"] == expected["population"]
    np.testing.assert_allclose(got["member_acc"], expected["member_acc"])
    assert got["rng"] == expected["rng"]


def test_population_state_round_trip(compose_train, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train([*TINY], out=tmp_path)
    module = instantiate(cfg.model)
    module._ensure_ready()
    module.member_acc = [0.1, 0.2, 0.3, 0.4]
    module.rng.random(3)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    checkpoint = torch.load(_save(checkpoint, tmp_path), weights_only=False)  # through a real file

    fresh = instantiate(cfg.model)
    assert fresh.population == []
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.population == module.population
    assert all(isinstance(g, Genotype) for g in fresh.population)
    assert fresh.member_acc == module.member_acc
    assert fresh.rng.random() == module.rng.random()
    assert fresh.tables["params"].to_dict() == module.tables["params"].to_dict()
    fresh._ensure_ready()  # restored: nothing is re-sampled or re-measured
    assert fresh.population == module.population


def _save(obj, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def test_params_bound_is_honoured(compose_train, tmp_path):
    from hydra.utils import instantiate

    loose = instantiate(compose_train([*TINY], out=tmp_path).model)
    loose._ensure_ready()
    sizes = sorted(loose.member_costs(g)["params_m"] for g in loose.population)
    bound = sizes[len(sizes) // 2]  # half the unconstrained population would break it
    tight = instantiate(compose_train([*TINY, f"model.max_params_m={bound}"], out=tmp_path).model)
    tight._ensure_ready()
    assert all(tight.member_costs(g)["params_m"] <= bound for g in tight.population)


def test_unreachable_constraint_is_one_sentence(compose_train, tmp_path):
    with pytest.raises(AutoclsError) as err:
        _train(compose_train, tmp_path, ["model.max_params_m=0.0001", "trainer.max_epochs=1"])
    message = str(err.value)
    assert message.startswith("No candidate can meet max_params_m=0.0001: the cheapest network of this search space")
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.selection=nsga4", "model.selection=nsga4 is unknown"),
        ("model.objectives=[flops]", "must name costs among params_m, latency_ms"),
        ("model.net.multiplier=1", "concatenate all 2 nodes"),
        ("model.max_latency_ms=-1", "must be positive"),
    ],
)
def test_bad_settings_are_one_sentence(compose_train, tmp_path, override, match):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from src.utils.errors import find_user_error

    with pytest.raises((AutoclsError, InstantiationException)) as err:
        instantiate(compose_train([*TINY, override], out=tmp_path).model)
    user_error = find_user_error(err.value)
    assert user_error is not None and match in str(user_error)


def test_latency_objective_builds_and_reuses_a_table(compose_train, tmp_path):
    from hydra.utils import instantiate

    fast = ["model.objectives=[latency_ms,params_m]", "model.latency.warmup=1", "model.latency.repeats=2", "model.latency.calibration=1"]
    module = instantiate(compose_train([*TINY, *fast], out=tmp_path).model)
    module._ensure_ready()
    costs = module.member_costs(module.population[0])
    assert costs["latency_ms"] > 0 and costs["params_m"] > 0
    table = module.tables["latency"].save(tmp_path / "lut.json")
    again = instantiate(compose_train([*TINY, *fast, f"model.latency.table={table}"], out=tmp_path).model)
    again._ensure_ready()
    assert again.member_costs(module.population[0])["latency_ms"] == pytest.approx(costs["latency_ms"])
    # a table of another network is refused in one sentence
    other = instantiate(compose_train([*TINY, *fast, f"model.latency.table={table}", "model.cost_net.C=6"], out=tmp_path).model)
    with pytest.raises(AutoclsError, match=r"was built for another network \(C=4 there but 6 here\); rebuild it"):
        other._ensure_ready()


# --- training a member of a front ----------------------------------------------------------------


@pytest.fixture
def front_file(tmp_path) -> Path:
    rows = [
        {"member": random_genotype(1).to_string(), "val_acc": 0.6, "params_m": 2.0, "latency_ms": 5.0},
        {"member": random_genotype(2).to_string(), "val_acc": 0.8, "params_m": 3.0, "latency_ms": 4.0},
        {"member": random_genotype(3).to_string(), "val_acc": 0.7, "params_m": 1.0, "latency_ms": 6.0},
    ]
    return write_json(rows, tmp_path / "pareto_front.json", method="cars")


@pytest.mark.parametrize(("member", "seed"), [(0, 1), ("2", 3), (-1, 3), ("best_acc", 2), ("smallest", 3), ("fastest", 2)])
def test_pick_member(front_file, member, seed):
    net = front_member_net(str(front_file), member, C=4, layers=3, num_classes=10, in_chans=1)
    assert net.genotype == random_genotype(seed)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_front_csv_is_accepted(front_file, tmp_path):
    from src.nas.front import write_csv

    csv_path = write_csv(load_front(front_file), tmp_path / "front.csv")
    assert pick_member(load_front(csv_path), "best_acc")["member"] == random_genotype(2).to_string()


@pytest.mark.parametrize(
    ("front", "member", "match"),
    [
        ("missing.json", 0, "does not exist"),
        (None, 0, "needs model.net.front"),
        ("front", 3, "member=3 is out of range: front .* has 3 members"),
        ("front", "biggest", "is not a member; use an index or one of best_acc, smallest, fastest"),
        ("empty", 0, "is empty"),
        ("garbage", 0, "Could not read the Pareto front"),
    ],
)
def test_front_errors_are_one_sentence(front_file, tmp_path, front, member, match):
    paths = {"front": front_file, "missing.json": tmp_path / "missing.json", None: None}
    (tmp_path / "empty.json").write_text(json.dumps({"front": []}))
    (tmp_path / "garbage.json").write_text("{not json")
    paths.update({"empty": tmp_path / "empty.json", "garbage": tmp_path / "garbage.json"})
    target = paths[front]
    with pytest.raises(AutoclsError, match=match):
        front_member_net(str(target) if target else None, member, C=4, layers=3, num_classes=10, in_chans=1)


def test_nas_random_gives_the_seeded_genotype(compose_train, front_file):
    from hydra.utils import instantiate

    for seed in (0, 5):
        cfg = compose_train(["experiment=cifar_cars_train", "nas=random", f"nas.seed={seed}", "model.net.C=4", "model.net.layers=3"])
        net = instantiate(cfg.model.net)
        assert net.genotype == random_genotype(seed)
    # with a front too, the random genotype wins (the baseline replaces the searched member)
    cfg = compose_train(["experiment=cifar_cars_train", "nas=random", f"model.net.front={front_file}", "model.net.C=4", "model.net.layers=3"])
    assert instantiate(cfg.model.net).genotype == random_genotype(0)
