"""`python train.py -m hparams_search=...` end to end: results, resuming after a kill, failures, pruning,
bad input, several workers, DDP trials. Sweeps run as real subprocesses (Hydra's multirun owns the process)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from src.hpo.storage import open_storage
from src.train import train

ROOT = Path(__file__).resolve().parents[1]
# one epoch of a narrow SmallCNN on digits: ~1 s a trial on an idle 2-core CPU
TINY = ["logger=none", "trainer.max_epochs=1", "model.net.width=8", "model.net.dropout=0.0",
        "optimizer.weight_decay=0.01"]


def sweep_command(log_dir: Path, *overrides: str, search: str = "digits_tpe") -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", f"hparams_search={search}", f"paths.log_dir={log_dir}",
            *TINY, *overrides]


def run_sweep(log_dir: Path, *overrides: str, search: str = "digits_tpe", timeout: int = 600):
    return subprocess.run(sweep_command(log_dir, *overrides, search=search), cwd=log_dir, capture_output=True,
                          check=False, text=True, timeout=timeout, env={**os.environ, "WANDB_MODE": "disabled"})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_study(sweep_dir: Path, name: str = "digits_tpe") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(sweep_dir / "optuna.journal")))


def test_sweep_records_complete_pruned_and_failed_trials_and_writes_results(tmp_path):
    """A grid over lr x width: width -1 crashes (FAIL, the sweep goes on), lr 1e-6 falls below the
    threshold pruner after one epoch (PRUNED, 1 epoch), lr 1e-2 completes both epochs and is the best."""
    result = run_sweep(
        tmp_path, "trainer.max_epochs=2", "hydra/sweeper/sampler=grid",
        "optimizer.lr=choice(1e-2,1e-6)", "model.net.width=choice(8,-1)",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner", "+hydra.sweeper.pruner.lower=0.3",
        "hydra.sweeper.keep_checkpoints=best",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    rows = read_csv(sweep_dir / "trials.csv")
    states = sorted(r["state"] for r in rows)
    assert states == ["COMPLETE", "FAIL", "FAIL", "PRUNED"]
    complete = next(r for r in rows if r["state"] == "COMPLETE")
    pruned = next(r for r in rows if r["state"] == "PRUNED")
    assert (complete["params/optimizer.lr"], complete["epochs"]) == ("0.01", "2")
    assert (pruned["params/optimizer.lr"], pruned["epochs"]) == ("1e-06", "1")
    assert float(pruned["val/acc_best"]) < 0.3 < float(complete["val/acc_best"])
    assert all(r["error"] and r["params/model.net.width"] == "-1" for r in rows if r["state"] == "FAIL")
    # every trial ran in <sweep dir>/<number>; those that trained hold metrics.json
    for row in (complete, pruned):
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["epochs"] == int(row["epochs"])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optimizer.lr": 0.01, "model.net.width": 8}
    assert results["best_overrides"] == ["optimizer.lr=0.01", "model.net.width=8"]
    assert results["n_trials"] == {"COMPLETE": 1, "FAIL": 2, "PRUNED": 1}
    assert (sweep_dir / "optimization_history.png").stat().st_size > 10_000
    assert (sweep_dir / "intermediate_values.png").is_file()
    assert "the sweep continues" in result.stdout + result.stderr
    # keep_checkpoints=best: only the best trial keeps its checkpoints
    assert list((Path(complete["run_dir"]) / "checkpoints").glob("*.ckpt"))
    assert not (Path(pruned["run_dir"]) / "checkpoints").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_stops_the_sweep_and_the_rerun_retries_the_trial(tmp_path):
    """A trial that hits "no space left on device" (here: a callback copying a file to /dev/full) would be
    followed by every later trial: the sweep stops with one sentence, and the rerun retries that point."""
    source = tmp_path / "payload.txt"
    source.write_text("x" * 1000)
    full_disk = ["+callbacks.fill_disk._target_=shutil.copyfile", f"+callbacks.fill_disk.src={source}",
                 "+callbacks.fill_disk.dst=/dev/full"]
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=2", *full_disk)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.match(r"Error: Trial 0 stopped: no space left on device; free space .* and rerun the "
                    "same command", lines[0]), lines[0]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    (cut_short,) = load_study(sweep_dir).trials[:1]
    assert cut_short.user_attrs.get("interrupted") and cut_short.state == optuna.trial.TrialState.FAIL

    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep_dir / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    retried = {k: float(v) for k, v in load_study(sweep_dir).trials[1].params.items()}
    assert retried == pytest.approx(cut_short.params)


def test_resumed_grid_covers_every_point_once(tmp_path):
    """A seeded grid stopped after 2 of its 4 points and resumed: the other 2 run, none twice (the grid
    sampler shuffles the grid with its seed, so a resumed one must not be re-seeded)."""
    grid = ["hydra/sweeper/sampler=grid", "hydra.sweeper.sampler.seed=42", "optimizer.lr=choice(1e-2,2e-2)",
            "model.net.width=choice(8,12)"]
    for n_trials in ("2", "null"):
        result = run_sweep(tmp_path, f"hydra.sweeper.n_trials={n_trials}", *grid)
        assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path / "train" / "hpo" / "digits_tpe")
    points = sorted((t.params["optimizer.lr"], t.params["model.net.width"]) for t in study.trials)
    assert points == [(1e-2, 8), (1e-2, 12), (2e-2, 8), (2e-2, 12)]


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """Kill -9 during trial 1 of 3, rerun the same command: trial 0 is kept (its metrics.json untouched),
    trial 1's parameters are retried, and the study ends with exactly 3 completed trials."""
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    args = ("hydra.sweeper.n_trials=3", "trainer.max_epochs=3")
    proc = subprocess.Popen(sweep_command(tmp_path, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 300
        while not (sweep_dir / "1").is_dir():  # trial 0 is told before trial 1's directory exists
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before trial 1"
            time.sleep(0.05)
        # at once: on a quiet machine a digits trial finishes within a second of its directory appearing
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    first = (sweep_dir / "0" / "metrics.json").stat().st_mtime_ns
    assert not (sweep_dir / "1" / "metrics.json").exists()

    result = run_sweep(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "0" / "metrics.json").stat().st_mtime_ns == first
    trials = {t.number: t for t in load_study(sweep_dir).trials}
    assert trials[1].state == optuna.trial.TrialState.FAIL and trials[1].user_attrs["interrupted"]
    completed = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 3
    assert any(t.params == trials[1].params for t in completed if t.number > 1)  # the cut-short trial, retried
    assert [r["state"] for r in read_csv(sweep_dir / "trials.csv")] == ["COMPLETE"] * 3


BAD_SPACE = """# @package _global_
defaults:
  - digits_tpe
hydra:
  sweeper:
    params:
      optimizer.lr: interval(1e-4
"""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hparams_search=bad_space"], r"Error: Cannot parse the search space 'interval\(1e-4' of optimizer.lr \(.*\); "),
        (["hydra.sweeper.storage=sqlite:////nonexistent_autocls_dir/x/study.db"],
         r"Error: Cannot open the Optuna storage 'sqlite:////nonexistent_autocls_dir/x/study.db'"),
        (["optimized_metric=val/accuracy"],
         r"Error: optimized_metric=val/accuracy is not a metric this run logs \(it logs: .*val/acc.*\); set "),
        (["hydra.sweeper.keep_checkpoints=some"],
         r"Error: hydra.sweeper.keep_checkpoints='some' is not one of all, best; "),
        # settings checked in the sweeper's setup, before Hydra calls sweep()
        (["hydra.sweeper.direction=up"], r"Error: hydra.sweeper.direction 'up' is neither maximize nor minimize; "),
        (["hydra.sweeper.n_trials=0"], r"Error: hydra.sweeper.n_trials=0 must be a positive whole number"),
        (["hydra.sweeper.timeout=-1"], r"Error: hydra.sweeper.timeout=-1(\.0)? must be a positive number of seconds"),
    ],
    ids=["malformed_space", "storage", "metric_never_logged", "keep_checkpoints", "direction", "n_trials", "timeout"],
)
def test_bad_sweep_input_is_one_sentence(tmp_path, overrides, message):
    """A malformed space in a search config, a storage that cannot be opened, a metric the run never logs
    (caught after the first epoch by the pruning callback): one `Error:` line, exit code 2."""
    (tmp_path / "extra" / "hparams_search").mkdir(parents=True)
    (tmp_path / "extra" / "hparams_search" / "bad_space.yaml").write_text(BAD_SPACE)
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=2", f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
                       *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.match(message, lines[0]), lines[0]


def test_pruning_callback_reattaches_to_the_trial_through_its_storage(compose_train, tmp_path):
    """In-process: the callback finds trial 0 by storage + study name + number, reports val/acc each
    epoch, and a pruner that rejects everything stops training after the first epoch as PRUNED."""
    spec = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(spec), direction="maximize")
    study.ask()
    pruner = "{_target_:optuna.pruners.ThresholdPruner,upper:0.0}"  # rejects any accuracy above 0
    cfg = compose_train(["trainer.max_epochs=3", "model.net.width=8", "logger=none",
                         f"++optuna_trial={{storage:'{spec}',study_name:s,number:0,pruner:{pruner}}}",
                         "+callbacks.optuna_pruning._target_=src.hpo.pruning.OptunaPruning",
                         "+callbacks.optuna_pruning.trial=${optuna_trial}"])
    metrics = train(cfg)
    trial = optuna.load_study(study_name="s", storage=open_storage(spec)).trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.user_attrs["epochs"] == 1
    assert trial.value == pytest.approx(trial.intermediate_values[1])
    assert metrics["epochs"] == 1 and "test/acc" in metrics


def test_pruning_callback_is_inert_outside_a_sweep(compose_train):
    cfg = compose_train(["trainer.max_epochs=1", "model.net.width=8", "logger=none",
                         "+callbacks.optuna_pruning._target_=src.hpo.pruning.OptunaPruning",
                         "+callbacks.optuna_pruning.trial=${optuna_trial}"])
    assert train(cfg)["epochs"] == 1


@pytest.mark.slow
def test_two_workers_share_one_journal_study(tmp_path):
    """Two sweep processes on one sweep dir: together they run exactly n_trials trials, each some."""
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    args = ("hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=null")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(sweep_command(tmp_path, *args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = run_sweep(tmp_path, *args)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    trials = [t for t in load_study(sweep_dir).trials if not t.user_attrs.get("surplus")]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # digits_tpe prunes (median)
    assert len(trials) == 6 and all(t.state in finished for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2
    assert len(read_csv(sweep_dir / "trials.csv")) == 6


@pytest.mark.slow
def test_trials_that_train_with_ddp(tmp_path):
    """trainer=ddp (2 CPU processes, gloo) inside a sweep: each trial's rank 1 re-runs that trial (not the
    sweep), in the trial's directory; the second trial starts a fresh process group."""
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=2", "trainer=ddp", "trainer.accelerator=cpu",
                       "trainer.devices=2", "trainer.precision=32-true", "trainer.sync_batchnorm=false",
                       "trainer.max_epochs=2", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    study = load_study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for n in (0, 1):
        metrics = json.loads((sweep_dir / str(n) / "metrics.json").read_text())
        assert metrics["epochs"] == 2
    assert (result.stdout + result.stderr).count("Starting with 2 processes") == 2
    assert not (tmp_path / "train" / "runs").exists(), "a DDP child ran outside its trial's directory"


NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


def test_compare_runs_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_compare_runs_notebook_executes_on_a_sweep(tmp_path, monkeypatch):
    """notebooks/compare_runs.ipynb reads a real sweep's CSV logs and study storage without errors."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=3", "logger=csv")
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.setenv("AUTOCLS_LOG_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "1 sweeps under" in text and "digits_tpe: 3 trials in storage, 3 complete" in text
    assert any(o.get("output_type") == "display_data" for c in notebook.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_multi_objective_sweep_of_accuracy_and_measured_latency(tmp_path):
    """NSGA-II over width on digits with callbacks=latency_export (what cifar10_latency_mo does on CIFAR):
    each trial returns deploy/latency_ms; the sweep writes the Pareto front (YAML + PNG)."""
    result = run_sweep(
        tmp_path, "hydra.sweeper.n_trials=4", "callbacks=latency_export", "model.net.width=choice(4,32)",
        "optimized_metric=[val/acc_best,deploy/latency_ms]", "hydra.sweeper.direction=[maximize,minimize]",
        "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.population_size=2",
        "callbacks.latency_export.targets=[{backend:onnxruntime,precision:fp32,device:cpu,threads:1,batch_size:1}]",
        "callbacks.latency_export.repeats=10", "callbacks.latency_export.warmup=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    rows = read_csv(sweep_dir / "trials.csv")
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" and float(r["deploy/latency_ms"]) > 0 for r in rows)
    front = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["pareto_front"]
    assert front and all(set(p["values"]) == {"val/acc_best", "deploy/latency_ms"} for p in front)
    # no trial of the front is dominated by another trial
    for p in front:
        a, lat = p["values"]["val/acc_best"], p["values"]["deploy/latency_ms"]
        assert not any(float(r["val/acc_best"]) > a and float(r["deploy/latency_ms"]) < lat for r in rows)
    assert (sweep_dir / "pareto_front.png").is_file()


def test_enqueued_points_run_first_once_and_bad_keys_are_one_sentence(tmp_path):
    """hydra.sweeper.enqueue: the given points are the study's first trials; a rerun with a larger budget
    does not queue them again; a key outside the search space is one sentence."""
    space = ["hydra/sweeper/sampler=random", "optimizer.lr=choice(0.1,0.01,0.001)", "model.net.width=choice(4,8)",
             "+hydra.sweeper.enqueue=[{optimizer.lr:0.001,model.net.width:4},{optimizer.lr:0.1,model.net.width:8}]"]
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=2", *space)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_tpe"
    enqueued = [{"optimizer.lr": 0.001, "model.net.width": 4}, {"optimizer.lr": 0.1, "model.net.width": 8}]
    assert [t.params for t in sorted(load_study(sweep_dir).trials, key=lambda t: t.number)] == enqueued
    result = run_sweep(tmp_path, "hydra.sweeper.n_trials=3", *space)  # one more trial, the sampler's own
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_study(sweep_dir).trials
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    (tmp_path / "bad").mkdir()
    result = run_sweep(tmp_path / "bad", "hydra.sweeper.n_trials=1", *space[:3],
                       "+hydra.sweeper.enqueue=[{optimizer.momentum:0.9}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Error: hydra.sweeper.enqueue names optimizer.momentum, which the search space does not have" in result.stderr
