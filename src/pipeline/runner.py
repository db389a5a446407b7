"""Run a pipeline's steps in order, each as the subprocess a user would start by hand, in its own
directory `<pipeline_dir>/<NN>_<step>/`.

A step that finishes gets a `step.json` (its command, outputs, result and wall time); rerunning the same
command skips it and hands its outputs on again, so a killed pipeline continues at the step it was in.
That step starts again with its own resume: a train run from its `checkpoints/last.ckpt`, a sweep from
its Optuna journal, a PBA search from its state file. A finished step whose command would now differ
(other overrides, another earlier result) is never silently reused or overwritten: the rerun stops
with a sentence naming the folder to delete.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from src.pipeline.kinds import display_command
from src.pipeline.report import write_report
from src.pipeline.steps import Step, plan, resolve_overrides, set_outputs
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig) -> Path | None:
    """Run (or continue) the pipeline; returns the path of its report (None for a dry run)."""
    steps = plan(cfg, check_compose=cfg.get("check_steps", True))
    pipeline_dir = Path(str(cfg.pipeline_dir)).expanduser().resolve()
    name = cfg.pipeline.get("name") or pipeline_dir.name
    log.info(f"Pipeline '{name}' in {pipeline_dir}: {', '.join(s.name for s in steps)}")
    records: list[dict] = []
    outputs: dict[str, dict] = {}
    try:
        for step in steps:
            set_outputs(cfg, outputs)
            command = step.kind.command(step, resolve_overrides(cfg, step))
            record = _finished(step, command)
            if cfg.get("dry_run"):
                state = "finished, skipped" if record else "to run"
                print(f"[{step.index}/{len(steps)}] {step.name} ({step.kind.name}, {state}):\n  {display_command(command)}")
                outputs[step.name] = record["outputs"] if record else step.planned_outputs()
                continue
            record = record or _run_step(step, command, len(steps))
            outputs[step.name] = record["outputs"]
            records.append(record)
    finally:
        if records and not cfg.get("dry_run"):
            write_report(pipeline_dir, name, records, total_steps=len(steps))
    if cfg.get("dry_run"):
        return None
    report = pipeline_dir / "report.md"
    log.info(f"Pipeline '{name}' finished; report: {report}")
    print(f"report: {report}")
    return report


def _finished(step: Step, command: list[str]) -> dict | None:
    """The record of a step that finished earlier with this command, outputs re-read from its folder;
    None when it has not finished."""
    if not step.marker.is_file():
        return None
    record = json.loads(step.marker.read_text())
    before = record["command"][1:]  # the interpreter may differ between reruns; the run may not
    if before != command[1:]:
        gone = [a for a in before if a not in command[1:]]
        new = [a for a in command[1:] if a not in before]
        raise AutoclsError(
            f"Step '{step.name}' finished earlier with another command (then: {' '.join(gone) or '-'}; now: "
            f"{' '.join(new) or '-'}); delete {step.dir} to run it again with the new settings, or set "
            "pipeline_dir=<another folder> for a fresh pipeline."
        )
    outcome = step.kind.collect(step)
    log.info(f"[{step.index}] {step.name}: finished earlier, skipped ({_headline(outcome.result)})")
    return {**record, "outputs": {**outcome.outputs, **step.declared_files()}, "result": outcome.result,
            "skipped": True}


def _run_step(step: Step, command: list[str], n_steps: int) -> dict:
    step.dir.mkdir(parents=True, exist_ok=True)
    resume = step.kind.resume_arguments(step)
    if resume:
        log.info(f"[{step.index}] {step.name}: continuing a run that was cut short ({' '.join(resume)})")
    log.info(f"[{step.index}/{n_steps}] {step.name} ({step.kind.name}): {display_command(command)}")
    log.info(f"[{step.index}/{n_steps}] {step.name}: log in {step.log}")
    started, start = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    code = _run_logged(step, [*command, *resume])
    if code != 0:
        raise AutoclsError(f"Step '{step.name}' failed (exit code {code}): {_cause(step.log)}; fix that and rerun "
                           f"the same command (finished steps are skipped). Its log: {step.log}")
    outcome = step.kind.collect(step)
    record = {
        "name": step.name, "index": step.index, "kind": step.kind.name, "dir": str(step.dir),
        "command": command, "started": started, "wall_time_s": round(time.perf_counter() - start, 1),
        "outputs": {**outcome.outputs, **step.declared_files()}, "result": outcome.result, "log": str(step.log),
    }
    _write_json(step.marker, record)
    log.info(f"[{step.index}/{n_steps}] {step.name}: done in {record['wall_time_s']:.0f} s ({_headline(outcome.result)})")
    return {**record, "skipped": False}


def _run_logged(step: Step, command: list[str]) -> int:
    """Run the command with its output appended to the step's log. Ctrl-C reaches the child too (same
    process group): wait while it saves its checkpoint, then stop with the sentence on resuming."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log fills as the run goes: `tail -f` works
    with open(step.log, "a") as out:
        out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {display_command(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        with _forward_sigterm(process):
            try:
                return process.wait()
            except KeyboardInterrupt:
                _wait_or_kill(process)
                raise AutoclsError(f"Interrupted during step '{step.name}'; rerun the same command to continue "
                                   "(finished steps are skipped, this one resumes).") from None


class _Terminated(Exception):
    pass


@contextmanager
def _forward_sigterm(process: subprocess.Popen):
    """SIGTERM (a scheduler's pre-emption) goes to the running step, which saves its checkpoint, then the
    pipeline stops; without this the step would run on orphaned."""

    def handler(signum, frame):
        process.send_signal(signal.SIGTERM)
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    except _Terminated:
        _wait_or_kill(process)
        raise AutoclsError("The pipeline was terminated; rerun the same command to continue (finished steps are "
                           "skipped, the running one resumes).") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_or_kill(process: subprocess.Popen, timeout: float = 120.0) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _cause(log_path: Path) -> str:
    """The line of this run's log that says why it failed: the project's `Error: <sentence>`, else
    Hydra's `Could not ...` or argparse's `error:` line, else a traceback's exception line, else the last."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    lines = lines[max((i for i, line in enumerate(lines) if line.startswith("=== ")), default=0) + 1:]
    tests = (
        lambda line: line.startswith("Error: "),
        lambda line: line.startswith("Could not ") or " error: " in line,
        lambda line: line.split(":", 1)[0].endswith(("Error", "Exception")) and ":" in line,
    )
    for test in tests:
        for line in reversed(lines):
            if test(line):
                return line.removeprefix("Error: ").rstrip(".")
    return lines[-1].rstrip(".") if lines else "it printed nothing"


def _headline(result: dict) -> str:
    value = result.get("value")
    text = f"{result['metric']}={value:.4f}" if value is not None else f"{result['metric']}=?"
    return text + (f", test/acc={result['test/acc']:.4f}" if "test/acc" in result else "")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)  # atomic: a kill never leaves half a marker
