"""Pareto fronts as files: the CSV and PNG a multi-objective search writes every epoch, the JSON of
its final front, and picking one member of a front to train (`experiment=cifar_cars_train
model.net.front=<file> model.net.member=<index|best_acc|smallest|fastest>`).

A front is a list of rows (dicts) with at least `member` (the architecture as a string: a DARTS
genotype or a BackboneNAS encoding) and `val_acc`, plus its costs (`params_m`, `latency_ms`) and,
after testing, `test_acc`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from src.utils.errors import AutoclsError

COST_LABELS = {"params_m": "parameters (M)", "latency_ms": "latency (ms)"}
PICKS = ("best_acc", "smallest", "fastest")


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(rows: Sequence[dict], path: str | Path, **info) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, "front": list(rows)}, indent=1) + "\n")
    return path


def plot_front(candidates: Sequence[dict], front: Sequence[dict], path: str | Path, cost: str = "params_m", title: str = "") -> Path:
    """Accuracy against `cost`: every evaluated candidate (grey: dropped, blue: kept) and the Pareto
    front as a red staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for kept, colour, label in ((False, "0.7", "dropped"), (True, "tab:blue", "population")):
        pts = [(r[cost], r["val_acc"]) for r in candidates if bool(r.get("selected", True)) == kept]
        if pts:
            ax.scatter(*zip(*pts), s=14, c=colour, label=label, zorder=2)
    ordered = sorted(front, key=lambda r: r[cost])
    if ordered:
        xs, ys = [r[cost] for r in ordered], [r["val_acc"] for r in ordered]
        ax.step(xs, ys, where="post", c="tab:red", lw=1.2, zorder=3)
        ax.scatter(xs, ys, s=30, c="tab:red", marker="D", label="Pareto front", zorder=4)
    ax.set_xlabel(COST_LABELS.get(cost, cost))
    ax.set_ylabel("validation accuracy (shared weights)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- reading a front back ------------------------------------------------------------------------


def load_front(path: str | Path) -> list[dict]:
    """The rows of a front file: the JSON a search writes (`pareto_front.json`) or one of its CSVs."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise AutoclsError(f"Pareto front file {path} does not exist; pass the pareto_front.json (or a front CSV) of a search run.")
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = [dict(r) for r in csv.DictReader(f)]
        else:
            data = json.loads(path.read_text())
            rows = data["front"] if isinstance(data, dict) else data
    except (ValueError, KeyError, TypeError, csv.Error) as err:
        raise AutoclsError(f"Could not read the Pareto front {path} ({type(err).__name__}); pass a file written by the search.") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "member" in r for r in rows):
        raise AutoclsError(f"{path} is not a Pareto front (rows with a 'member' column); pass a file written by the search.")
    if not rows:
        raise AutoclsError(f"The Pareto front {path} is empty; the search kept no member, so there is nothing to train.")
    return rows


def pick_member(rows: Sequence[dict], member: int | str, origin: str = "the front") -> dict:
    """One row: by position, or `best_acc` (highest validation accuracy), `smallest` (fewest
    parameters) or `fastest` (lowest latency)."""
    if isinstance(member, str) and member.strip().lstrip("-").isdigit():
        member = int(member)
    if isinstance(member, int) and not isinstance(member, bool):
        if not -len(rows) <= member < len(rows):
            raise AutoclsError(f"model.net.member={member} is out of range: {origin} has {len(rows)} members (0 to {len(rows) - 1}).")
        return rows[member]
    if member == "best_acc":
        return max(rows, key=lambda r: float(r["val_acc"]))
    if member in ("smallest", "fastest"):
        key = "params_m" if member == "smallest" else "latency_ms"
        if any(r.get(key) in (None, "") for r in rows):
            raise AutoclsError(f"model.net.member={member} needs {key}, which {origin} does not record; pick an index or best_acc.")
        return min(rows, key=lambda r: float(r[key]))
    raise AutoclsError(f"model.net.member={member!r} is not a member; use an index or one of {', '.join(PICKS)}.")


def front_member_net(front: str | None = None, member: int | str = "best_acc", genotype=None, **net_kwargs):
    """A DARTS evaluation network (NetworkCIFAR) of one member of a CARS front, or of `genotype` when
    one is given (`nas=random` sets a random one: the same training recipe for the baseline).

    The checkpoint config records `front` and `member`, so the front file must stay where it was to
    rebuild the network from the checkpoint."""
    from src.models.darts_net import NetworkCIFAR

    if genotype is None:
        if front is None:
            raise AutoclsError(
                "experiment=cifar_cars_train needs model.net.front=<pareto_front.json of a CARS run> (or a genotype via nas=random)."
            )
        row = pick_member(load_front(front), member, origin=f"front {front}")
        genotype = row["member"]
    return NetworkCIFAR(genotype=genotype, **net_kwargs)


def write_population(
    out_dir: Path, step: int, members: Sequence, accuracy, costs: Sequence[dict], objectives: Sequence[str],
    kept: set, front_idx, n_parents: int, new_origin: str, title: str,
) -> tuple[list[dict], list[dict], Path]:
    """One search step's files: every candidate as a row (`population_<step>.csv`, with its
    non-domination rank, whether selection kept it, and whether it is a parent or new), the Pareto
    front (`front_<step>.csv`, `front_<step>.png` over the first cost objective). Returns the rows of
    all candidates, those of the front, and the PNG's path. Shared by CARS and BackboneNAS, whose
    members differ only in `to_string()`."""
    import numpy as np

    from src.nas.pareto import front_ranks

    ranks = front_ranks(np.column_stack([-np.asarray(accuracy), [[c[o] for o in objectives] for c in costs]]))
    rows = [
        {
            "member": m.to_string(),
            "val_acc": float(accuracy[i]),
            **{k: round(v, 6) for k, v in costs[i].items()},
            "rank": int(ranks[i]),
            "selected": i in kept,
            "origin": "parent" if i < n_parents else new_origin,
        }
        for i, m in enumerate(members)
    ]
    front = [rows[i] for i in front_idx]
    write_csv(rows, Path(out_dir) / f"population_{step:03d}.csv")
    write_csv(front, Path(out_dir) / f"front_{step:03d}.csv")
    png = plot_front(rows, front, Path(out_dir) / f"front_{step:03d}.png", objectives[0], title)
    return rows, front, png
