"""Latency tables as the scripts print them: markdown, with each row's speed-up over a baseline
measured in the same run."""

from __future__ import annotations

from collections.abc import Sequence

from src.deploy.latency import LatencyResult


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def latency_table(results: Sequence[tuple[str, LatencyResult]], baseline: str | None = None) -> str:
    """One row per (name, result): batch, threads, median, p90, images/s and `speed-up` = the baseline's
    median over this row's, where the baseline is the row named `baseline` on the same device with the
    same batch size and thread count (None: no speed-up column)."""
    by_key = {(name, r.device, r.batch_size, r.threads): r for name, r in results}
    headers = ["backend", "device", "batch", "threads", "median ms", "p90 ms", "images/s"]
    if baseline is not None:
        headers.append(f"speed-up vs {baseline}")
    rows = []
    for name, r in results:
        row: list[object] = [name, r.device, r.batch_size, r.threads, r.median_ms, r.p90_ms, r.images_per_s]
        if baseline is not None:
            base = by_key.get((baseline, r.device, r.batch_size, r.threads))
            row.append(f"{base.median_ms / r.median_ms:.2f}x" if base else None)
        rows.append(row)
    return markdown_table(headers, rows)
