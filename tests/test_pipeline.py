"""`python pipeline.py pipeline=...`: steps run in order as real subprocesses, outputs feed later steps,
finished steps are skipped after a kill, the report covers every step, bad input ends in one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from src.pipeline.kinds import TrainRun
from src.pipeline.runner import run_pipeline
from src.pipeline.steps import plan, resolve_overrides, set_outputs
from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# every step's run at its smallest: 2 training batches, 1 validation and 1 test batch, no logger
TINY = ["logger=none", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1"]
# tiny networks on a shared 2-core CPU: a second intra-op thread only adds synchronisation (see conftest)
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

# a DARTS search whose genotype a training run then uses: the smallest pipeline with a hand-over
TWO_STEP = {
    "name": "two_step",
    "budget": {"train_epochs": 1},
    "every_step": TINY,
    "steps": {
        "search": {"kind": "train", "overrides": ["experiment=digits_darts", "trainer.max_epochs=1"],
                   "outputs": {"genotype": "genotype.json"}},
        "train": {"kind": "train", "overrides": [
            "model/net=darts_net", "model.net.genotype=${steps.search.genotype}", "model.net.C=4",
            "model.net.layers=3", "trainer.max_epochs=${pipeline.budget.train_epochs}"]},
    },
}


def pipeline_command(tmp_path: Path, *overrides: str, pipeline: dict | None = None) -> list[str]:
    """pipeline.py with logs under tmp_path; `pipeline` is written as a config in a --config-dir."""
    extra = []
    if pipeline is not None:
        conf = tmp_path / "conf" / "pipeline"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / f"{pipeline['name']}.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
        extra = ["--config-dir", str(tmp_path / "conf"), f"pipeline={pipeline['name']}"]
    return [sys.executable, str(ROOT / "pipeline.py"), *extra, f"paths.log_dir={tmp_path / 'logs'}", *overrides]


def run(command: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, env=ENV, timeout=timeout)


def compose_pipeline(tmp_path: Path, *overrides: str, pipeline: dict | None = None):
    """The config pipeline.py would run (in-process); `pipeline` replaces the composed pipeline node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("pipeline", overrides=[f"paths.log_dir={tmp_path / 'logs'}",
                                             *(["pipeline=digits_auto"] if pipeline else []), *overrides])
    GlobalHydra.instance().clear()
    if pipeline is not None:
        with open_dict(cfg):
            cfg.pipeline = OmegaConf.create(pipeline)
    return cfg


def checkpoint_config(run_dir: Path) -> dict:
    """The resolved config a run trained with, as its checkpoint stores it."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["autocls"]["config"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, f"the pipeline ended (exit {process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def test_killed_pipeline_skips_finished_steps_on_rerun_and_reports(tmp_path):
    """Kill the pipeline (and its running step) with SIGKILL as soon as step 1 has finished; the rerun
    leaves step 1 untouched, runs step 2 with step 1's genotype, and reports both steps."""
    pipe_dir = tmp_path / "logs" / "pipeline" / "two_step"
    search, train = pipe_dir / "01_search", pipe_dir / "02_train"
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(pipeline_command(tmp_path, pipeline=TWO_STEP), stdout=out, stderr=subprocess.STDOUT,
                                 env=ENV, start_new_session=True)  # its own group: the kill takes the step too
        try:
            wait_for(search / "step.json", first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not (train / "step.json").exists()
    marker_before = (search / "step.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (search / "step.json", search / "genotype.json", search / "metrics.json")}

    rerun = run(pipeline_command(tmp_path, pipeline=TWO_STEP), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "search: finished earlier, skipped" in rerun.stdout  # Hydra logs to stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # step 1 was not run again
    assert (search / "step.json").read_text() == marker_before

    record = json.loads((train / "step.json").read_text())
    genotype = str(search / "genotype.json")
    assert f"model.net.genotype={genotype}" in record["command"]
    assert checkpoint_config(train)["model"]["net"]["genotype"] == genotype  # the run really used it
    summary = json.loads((pipe_dir / "summary.json").read_text())
    assert [(s["name"], s["skipped"]) for s in summary["steps"]] == [("search", True), ("train", False)]
    assert 0.0 <= summary["steps"][1]["result"]["value"] <= 1.0
    report = (pipe_dir / "report.md").read_text()
    assert "| 1 | search | train |" in report and "| 2 | train | train |" in report
    assert "01_search/alphas.png" in report and (pipe_dir / "steps.png").stat().st_size > 10_000
    assert f"report: {pipe_dir / 'report.md'}" in rerun.stdout

    # a finished step is never reused with other settings: one sentence names the folder to delete
    changed = run(pipeline_command(tmp_path, "pipeline.budget.train_epochs=2", pipeline=TWO_STEP))
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "Error: Step 'train' finished earlier with another command" in changed.stderr
    assert "now: trainer.max_epochs=2" in changed.stderr and f"delete {train} to run it again" in changed.stderr

    # a finished step whose output has gone: the sentence names the file and the folder to delete
    (search / "genotype.json").unlink()
    missing = run(pipeline_command(tmp_path, pipeline=TWO_STEP))
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"Error: Step 'search' finished but {search} holds no genotype.json (its output 'genotype'); make its "
        f"overrides select a run that writes it (or fix outputs.genotype), then delete {search} and rerun.")


@pytest.mark.slow
def test_a_step_killed_after_an_epoch_continues_from_its_checkpoint(tmp_path):
    """Kill during the search's second epoch: the rerun continues the search from last.ckpt (not from
    scratch) and the pipeline completes."""
    pipeline = json.loads(json.dumps(TWO_STEP))
    pipeline["steps"]["search"]["overrides"][1] = "trainer.max_epochs=4"
    search = tmp_path / "logs" / "pipeline" / "two_step" / "01_search"
    first = subprocess.Popen(pipeline_command(tmp_path, pipeline=pipeline), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        wait_for(search / "checkpoints" / "last.ckpt", first)
        time.sleep(1.0)  # let the checkpoint file be written whole; epoch 1 takes longer than that
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (search / "step.json").exists() and (search / "checkpoints" / "last.ckpt").is_file()

    rerun = run(pipeline_command(tmp_path, pipeline=pipeline), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "search: continuing a run that was cut short" in rerun.stdout
    log = (search / "step.log").read_text()
    assert log.count("\n=== ") == 2 and f"Resuming from {search / 'checkpoints' / 'last.ckpt'}" in log
    assert json.loads((search / "metrics.json").read_text())["epochs"] == 4
    assert (tmp_path / "logs" / "pipeline" / "two_step" / "02_train" / "step.json").is_file()


@pytest.mark.slow
def test_digits_auto_runs_end_to_end_and_the_final_training_uses_every_finding(tmp_path):
    """search -> hpo -> augment -> train at the smallest budgets (~4 min on a shared 2-core CPU)."""
    budgets = ["pipeline.budget.search_epochs=1", "pipeline.budget.hpo_trials=2", "pipeline.budget.hpo_epochs=1",
               "pipeline.budget.pba_population=2", "pipeline.budget.pba_epochs=2", "pipeline.budget.pba_interval=1",
               "pipeline.budget.train_epochs=1", "pipeline.budget.C=4"]
    command = [*pipeline_command(tmp_path, "pipeline=digits_auto", *budgets), f"every_step={TINY}"]
    result = run(command, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe_dir = tmp_path / "logs" / "pipeline" / "digits_auto"
    records = {name: json.loads((pipe_dir / f"{i:02d}_{name}" / "step.json").read_text())
               for i, name in enumerate(["search", "hpo", "augment", "train"], 1)}
    assert [r["kind"] for r in records.values()] == ["train", "sweep", "pba", "train"]
    genotype = records["search"]["outputs"]["genotype"]
    best_params = records["hpo"]["outputs"]["best_params"]
    schedule = records["augment"]["outputs"]["schedule"]
    assert json.loads(Path(genotype).read_text())["normal"] and set(best_params) == {"optimizer.lr",
                                                                                     "optimizer.weight_decay"}
    assert json.loads(Path(schedule).read_text())["format"] == "autocls-pba-schedule"
    # the sweep and the PBA members trained the found cell too
    assert f"model.net.genotype={genotype}" in records["hpo"]["command"]
    assert f"model.net.genotype={genotype}" in records["augment"]["command"]

    used = checkpoint_config(pipe_dir / "04_train")
    assert used["model"]["net"]["_target_"] == "src.models.darts_net.NetworkCIFAR"
    assert used["model"]["net"]["genotype"] == genotype
    assert used["optimizer"]["lr"] == pytest.approx(best_params["optimizer.lr"])
    assert used["optimizer"]["weight_decay"] == pytest.approx(best_params["optimizer.weight_decay"])
    assert used["augmentation"]["_target_"] == "src.augment.pba.PBAAugmentation"
    assert used["augmentation"]["schedule"] == schedule

    report = (pipe_dir / "report.md").read_text()
    for i, (name, kind) in enumerate([("search", "train"), ("hpo", "sweep"), ("augment", "pba"), ("train", "train")], 1):
        assert f"| {i} | {name} | {kind} |" in report
    assert "02_hpo/optimization_history.png" in report and "`optimizer.lr=" in report

    again = run(command, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4


def test_every_pipeline_config_composes_and_resolves_its_steps(tmp_path, capsys):
    """Each configs/pipeline/*.yaml plans (kinds, references, each step's train.py config composes), and
    the last step of the AutoML pipelines uses the search's genotype and the PBA schedule."""
    for path in sorted((CONFIGS / "pipeline").glob("*.yaml")):
        cfg = compose_pipeline(tmp_path, f"pipeline={path.stem}")
        steps = plan(cfg, check_compose=True)
        assert [s.kind.name for s in steps] == ["train", "sweep", "pba", "train"], path.stem
        pipe_dir = tmp_path / "logs" / "pipeline" / path.stem
        assert [s.dir for s in steps] == [pipe_dir / f"0{i}_{s.name}" for i, s in enumerate(steps, 1)]
        set_outputs(cfg, {s.name: s.planned_outputs() for s in steps})
        final = resolve_overrides(cfg, steps[-1])
        assert f"model.net.genotype={pipe_dir / '01_search' / 'genotype.json'}" in final
        assert "augmentation=pba" in final and f"augmentation.schedule={pipe_dir / '03_augment' / 'schedule.json'}" in final

    cfg = compose_pipeline(tmp_path, "pipeline=cifar10_auto", "dry_run=true")
    assert run_pipeline(cfg) is None
    printed = capsys.readouterr().out
    assert printed.count("to run") == 4 and "python scripts/pba_search.py --out" in printed
    assert "hparams_search=cifar10_tpe" in printed and "trainer=gpu" in printed
    assert not (tmp_path / "logs" / "pipeline" / "cifar10_auto" / "01_search").exists()  # nothing ran


def test_a_killed_train_step_continues_from_its_last_checkpoint(tmp_path):
    steps = plan(compose_pipeline(tmp_path, pipeline=TWO_STEP), check_compose=False)
    assert TrainRun().resume_arguments(steps[1]) == []
    (steps[1].dir / "checkpoints").mkdir(parents=True)
    (steps[1].dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert TrainRun().resume_arguments(steps[1]) == [f"ckpt_path={steps[1].dir / 'checkpoints' / 'last.ckpt'}"]


def _with_step(change: dict) -> dict:
    pipeline = json.loads(json.dumps(TWO_STEP))
    pipeline["steps"]["train"].update(change)
    return pipeline


@pytest.mark.parametrize("change, message", [
    ({"kind": "fit"}, "Step 'train' has kind 'fit'; set its kind to one of train, sweep, pba."),
    ({"overides": []}, "Step 'train' has the unknown key(s) overides; a step takes kind, overrides, outputs, args, metric."),
    ({"args": {"population": 2}}, "Step 'train' of kind train has args; only pba steps take args"),
    ({"kind": "sweep", "metric": "val/acc"}, "Step 'train' of kind sweep has a metric; only train steps take one"),
    ({"overrides": ["model.net.genotype=${steps.search.genotyp}"]},
     ("Step 'train' cannot resolve its overrides (Interpolation key 'steps.search.genotyp' not found); a step can use "
      "only the outputs of the steps before it (here: search.{dir,metrics,ckpt,genotype}).")),
    ({"overrides": ["model/net=darts_net", "model.net.widht=3"]},
     "Step 'train' does not compose a train.py config (Could not override 'model.net.widht'.)"),
])
def test_bad_pipeline_configs_fail_before_anything_runs(tmp_path, change, message):
    cfg = compose_pipeline(tmp_path, pipeline=_with_step(change))
    with pytest.raises(AutoclsError) as err:
        run_pipeline(cfg)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "logs" / "pipeline" / "two_step" / "01_search").exists()


def test_a_step_that_refers_to_a_later_one_names_the_earlier_steps(tmp_path):
    pipeline = json.loads(json.dumps(TWO_STEP))
    pipeline["steps"]["search"]["overrides"].append("model.net.C=${steps.train.ckpt}")
    with pytest.raises(AutoclsError, match=r"Step 'search' cannot resolve .* \(here: none\)\."):
        run_pipeline(compose_pipeline(tmp_path, pipeline=pipeline))


def test_a_failing_step_stops_the_pipeline_with_its_error_sentence(tmp_path):
    """Without the up-front check (check_steps=false) the bad key reaches the step's own train.py, whose
    Hydra error becomes the cause in the pipeline's sentence; the step gets no marker."""
    pipeline = {"name": "broken", "steps": {"train": {"kind": "train", "overrides": [*TINY, "model.net.widht=3"]}}}
    with pytest.raises(AutoclsError) as err:
        run_pipeline(compose_pipeline(tmp_path, "check_steps=false", pipeline=pipeline))
    step_dir = tmp_path / "logs" / "pipeline" / "broken" / "01_train"
    assert str(err.value) == ("Step 'train' failed (exit code 1): Could not override 'model.net.widht'; fix that and "
                              "rerun the same command (finished steps are skipped). Its log: "
                              f"{step_dir / 'step.log'}")
    assert not (step_dir / "step.json").exists()
