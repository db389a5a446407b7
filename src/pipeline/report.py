"""The pipeline's report, rewritten after every run of `pipeline.py` from the steps' records:

    report.md     one table row per step (kind, headline metric, test accuracy, time, what it found),
                  then per step its command, outputs and plots (the search's alphas heatmap, the sweep's
                  optimisation history, ...), linked relative to the pipeline folder
    steps.png     each step's headline metric (and test accuracy where the step tested) side by side
    summary.json  the records themselves, for notebooks and tests
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from src.pipeline.kinds import display_command

log = logging.getLogger(__name__)

SUMMARY, PLOT, REPORT = "summary.json", "steps.png", "report.md"


def write_report(pipeline_dir: Path, name: str, records: list[dict], total_steps: int) -> Path:
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    (pipeline_dir / SUMMARY).write_text(json.dumps({"pipeline": name, "steps": records}, indent=1, default=str) + "\n")
    plot = _plot(pipeline_dir / PLOT, name, records)
    lines = [f"# Pipeline `{name}`", ""]
    done = f"{len(records)} of {total_steps} steps finished" if len(records) < total_steps else "all steps finished"
    lines += [f"Folder: `{pipeline_dir}` ({done}; machine: {_machine()}).", ""]
    lines += ["| # | step | kind | result | test/acc | wall time | found |", "|---|---|---|---|---|---|---|"]
    for r in records:
        result = r["result"]
        value = "" if result.get("value") is None else f"{result['metric']} = {result['value']:.4f}"
        test = f"{result['test/acc']:.4f}" if "test/acc" in result else ""
        ran = f"{r['wall_time_s']:.0f} s" + (" (earlier run)" if r.get("skipped") else "")
        lines.append(f"| {r['index']} | {r['name']} | {r['kind']} | {value} | {test} | {ran} | {_found(r, pipeline_dir)} |")
    if plot:
        lines += ["", f"![each step's result]({PLOT})"]
    for r in records:
        lines += ["", f"## {r['index']}. {r['name']} ({r['kind']})", "", "```", display_command(r["command"]), "```", ""]
        for key, value in r["outputs"].items():
            if key in ("metrics", "best_overrides"):  # the metrics are in the table, the overrides in best_params
                continue
            lines.append(f"- {key}: {_link(value, pipeline_dir)}")
        for png in sorted(Path(r["dir"]).glob("*.png")):
            lines += ["", f"![{png.stem}]({png.relative_to(pipeline_dir)})"]
    path = pipeline_dir / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def _found(record: dict, pipeline_dir: Path) -> str:
    """The step's findings in a table cell: its declared files, best params or schedule."""
    outputs = record["outputs"]
    if record["kind"] == "sweep":
        return "<br>".join(f"`{o}`" for o in outputs.get("best_overrides", []))
    standard = {"dir", "metrics", "ckpt", "best_score"}
    found = {k: v for k, v in outputs.items() if k not in standard} or {"ckpt": outputs.get("ckpt")}
    return "<br>".join(f"{k}: {_link(v, pipeline_dir)}" for k, v in found.items())


def _link(value, pipeline_dir: Path) -> str:
    if isinstance(value, str) and value.startswith(str(pipeline_dir)):
        relative = Path(value).relative_to(pipeline_dir)
        return f"[{relative}]({relative})"
    return f"`{value}`"


def _plot(path: Path, name: str, records: list[dict]) -> Path | None:
    """Bars of each step's headline metric, with test accuracy beside it where the step has one."""
    scored = [r for r in records if r["result"].get("value") is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['index']}. {r['name']}\n{r['result']['metric']}" for r in scored]
    values = [r["result"]["value"] for r in scored]
    tests = [r["result"].get("test/acc") for r in scored]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(scored)), 4.0))
    x = range(len(scored))
    width = 0.38 if any(t is not None for t in tests) else 0.6
    bars = ax.bar([i - width / 2 if width < 0.5 else i for i in x], values, width, label="step's metric")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if width < 0.5:
        test_bars = ax.bar([i + width / 2 for i in x], [t or 0.0 for t in tests], width, label="test/acc")
        ax.bar_label(test_bars, labels=[f"{t:.3f}" if t is not None else "" for t in tests], fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, max(1.0, *values) * 1.15)  # headroom for the legend above 1.0
    ax.set_title(f"pipeline {name}: result of each step")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine() -> str:
    from src.utils.machine import describe_machine

    return describe_machine()
