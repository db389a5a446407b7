"""W&B tables of the searches (src/nas/wandb_tables.py): DARTS's genotype per epoch, the population and
front of CARS and BackboneNAS per epoch/generation, logged by real offline W&B runs of tiny searches
(no account, no network) and read back from the run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from src.nas.genotypes import Genotype
from src.nas.wandb_tables import table_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_data_takes_every_column_and_fills_the_gaps():
    rows = [{"member": "a", "val_acc": 0.5}, {"member": "b", "params_m": 1.2, "val_acc": 0.7}]
    assert table_data(rows) == (["member", "val_acc", "params_m"], [["a", 0.5, None], ["b", 0.7, 1.2]])


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """No W&B account and no network: the runs stay in their folders (as for a user not logged in)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    yield
    import wandb

    wandb.finish()


def _media(out: Path, kind: str, key: str, suffix: str) -> list[Path]:
    """The files of `search/<key>` the offline run stored, in logging order (named <key>_<step>_<hash>)."""
    (run,) = (out / "wandb").glob("offline-run-*")
    files = (run / "files" / "media" / kind / "search").glob(f"{key}_*{suffix}")
    return sorted(files, key=lambda p: int(p.name.split("_")[-2]))


def _tables(out: Path, key: str) -> list[dict]:
    return [json.loads(f.read_text()) for f in _media(out, "table", key, ".table.json")]


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


SEARCHES = {
    "darts": ["experiment=digits_darts", "model.net.C=4", "model.net.layers=3", "model.net.steps=2", "model.net.multiplier=2",
              "+trainer.limit_train_batches=2"],
    "cars": ["experiment=digits_cars", "model.net.C=4", "model.net.layers=3", "model.net.steps=2", "model.net.multiplier=2",
             "model.cost_net.C=4", "model.cost_net.layers=3", "model.population_size=4", "model.warmup_epochs=1",
             "+trainer.limit_train_batches=2"],
    "backbone_nas": ["model=backbone_nas", "model/net=backbone_space", "model.net.depths=[1,2]", "model.net.widths=[8,16]",
                     "model.net.stem_width=8", "model.population_size=3", "model.steps_per_candidate=2"],
}


@pytest.mark.parametrize("search", SEARCHES)
def test_searches_log_their_results_as_wandb_tables(search, compose_train, tmp_path, offline_wandb):
    from src.train import train

    out = tmp_path / "run"
    common = ["logger=wandb", "trainer.max_epochs=2", "data.batch_size=32", "+trainer.limit_val_batches=1", "test=false"]
    train(compose_train([*SEARCHES[search], *common], out=out))

    if search == "darts":
        tables = _tables(out, "genotypes")
        assert len(tables) == 2  # one per epoch, each with every epoch so far
        last = tables[-1]
        assert last["columns"] == ["epoch", "genotype", "params_m"]
        assert [row[0] for row in last["data"]] == [0, 1]
        assert Genotype.parse_string(last["data"][1][1]) == Genotype.from_json((out / "genotype.json").read_text())
        assert len(_media(out, "images", "alphas", ".png")) == 2  # the heatmap beside it
        return
    folder = out / search
    population, front = _tables(out, "population"), _tables(out, "front")
    assert len(population) == len(front) == 2  # per epoch (CARS) / generation (BackboneNAS)
    for step, (table, front_table) in enumerate(zip(population, front)):
        rows = _rows(folder / f"population_{step:03d}.csv")
        assert len(table["data"]) == len(rows) and len(front_table["data"]) == len(_rows(folder / f"front_{step:03d}.csv"))
        members = table["columns"].index("member")
        assert [row[members] for row in table["data"]] == [r["member"] for r in rows]
        assert {row[0] for row in table["data"]} == {step}  # the epoch / generation column
    assert len(_media(out, "images", "front_plot", ".png")) == 2
