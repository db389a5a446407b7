"""Accuracy vs latency of one trained model pruned at several ratios and briefly fine-tuned.

    python scripts/prune_curve.py --ckpt <train.py checkpoint> [--ratios 0.25 0.5 0.75] [--epochs 2] \
        [--out-dir logs/prune_curve] [-- optimizer.lr=0.01 ...]

For each ratio: structured channel pruning (torch-pruning, L2 magnitude, classifier kept whole) of the
checkpoint's network, `--epochs` of fine-tuning with the checkpoint's own recipe (data, augmentation,
loss, optimizer, a schedule over the short run; trailing `key=value` arguments change that recipe), then
params, FLOPs, latency (`--backend`, batch 1, `--threads`) and top-1 on the test split, before and
after. Writes prune_curve.csv and prune_curve.png (top-1 vs latency, the unpruned model included) and
each fine-tuned model as ONNX (pruned_<ratio>/model.onnx).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["ratio", "epochs", "params_m", "mflops", "latency_ms", "latency_p90_ms", "top1_pruned", "top1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tune epochs per ratio")
    parser.add_argument("--backend", default="onnxruntime", help="latency backend label, e.g. onnxruntime, torch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "logs" / "prune_curve")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the fine-tune recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("src.deploy.compress").setLevel(logging.INFO)  # one line per ratio
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # fine-tuning's chatter
        logging.getLogger(name).setLevel(logging.WARNING)

    from src.utils.task import user_errors_as_messages

    print(user_errors_as_messages(prune_curve)(args))


def prune_curve(args: argparse.Namespace) -> str:
    from src.deploy.backends import parse_target
    from src.deploy.compress import compress, training_datamodule
    from src.deploy.tables import markdown_table
    from src.deploy.trained_net import load_trained_net
    from src.utils.machine import describe_machine

    trained = load_trained_net(args.ckpt)
    target = parse_target(args.backend, threads=args.threads)
    datamodule = training_datamodule(trained.config)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in args.ratios:
        _, row = compress(trained.net, trained.config, datamodule, ratio, epochs=args.epochs, overrides=args.overrides,
                          target=target, workdir=args.out_dir, warmup=args.warmup, repeats=args.repeats)
        rows.append(row)
    base = {"ratio": 0.0, "epochs": 0, **{k.removesuffix("_before"): v for k, v in rows[0].items() if k.endswith("_before")}}
    base["top1_pruned"] = base["top1"]
    table = [base, *rows]
    with open(args.out_dir / "prune_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    _plot(table, args.out_dir / "prune_curve.png", f"{Path(args.ckpt).name}, {target.name}")
    body = [[r["ratio"], r["epochs"], r["params_m"], r["mflops"], r["latency_ms"], r["latency_p90_ms"],
             f"{100 * r['top1_pruned']:.2f}%", f"{100 * r['top1']:.2f}%", f"{table[0]['latency_ms'] / r['latency_ms']:.2f}x"]
            for r in table]
    headers = ["ratio", "fine-tune epochs", "params (M)", "MFLOPs", "latency ms", "p90 ms", "top-1 pruned",
               "top-1 fine-tuned", "speed-up"]
    return "\n".join([
        f"Machine: {describe_machine()}",
        f"Latency: {target.name} (median of {args.repeats} after {args.warmup} warm-up); top-1 on the test split.",
        "",
        markdown_table(headers, body),
        "",
        f"Wrote {args.out_dir / 'prune_curve.csv'} and {args.out_dir / 'prune_curve.png'}",
    ])


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    latency = [r["latency_ms"] for r in rows]
    top1 = [100 * r["top1"] for r in rows]
    ax.plot(latency, top1, "o-", color="tab:blue", label="pruned + fine-tuned")
    ax.plot(latency[1:], [100 * r["top1_pruned"] for r in rows[1:]], "x", color="tab:red", label="pruned, before fine-tuning")
    for r, x, y in zip(rows, latency, top1):
        ax.annotate(f"ratio {r['ratio']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("latency, batch 1 (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
