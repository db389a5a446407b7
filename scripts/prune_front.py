"""The Pareto front of a compression search (`hparams_search=*_prune_mo`), re-measured on this machine.

    python scripts/prune_front.py --sweep-dir logs/train/hpo/cifar10_prune_mo [--split test] [--threads 1] \
        [--repeats 200] [--out docs/prune_front.md]

Reads the sweep's pareto_models.csv (rebuilt from optimization_results.yaml when missing). For the base
network (the trials' `model.net.ckpt_path`, unpruned, in onnxruntime fp32 and INT8) and for every front
model (the ONNX file its trial exported: the INT8 graph for INT8 trials) it prints the stage ratios,
precision, parameters, MFLOPs, the val top-1 (the sweep's objective; the base's measured here), the
top-1 on `--split` (default test: images the search never scored), and latency in onnxruntime (batch 1, `--threads`, median of `--repeats` after
`--warmup`), all timed in this run, with the speed-up against the unpruned fp32 base. The sweep's own
latencies were taken while it trained, so this re-measurement, on a quiet machine, is the one to report.
Writes prune_front.csv and prune_front.png (top-1 vs latency) into the sweep dir.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["model", "trial", "stage_ratios", "precision", "params_m", "mflops", "val_top1", "top1", "latency_ms",
           "latency_p90_ms", "speedup"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-dir", type=Path, required=True, help="the sweep's dir (holds optimization_results.yaml)")
    parser.add_argument("--split", default="test", help="data split for top-1 (test, val)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--calibration-images", type=int, default=256, help="for the base network's INT8 copy")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from src.utils.task import print_report, user_errors_as_messages

    print_report(user_errors_as_messages(prune_front)(args), args.out)


def prune_front(args: argparse.Namespace) -> str:
    from src.deploy.backends import DeployVariants
    from src.deploy.images import (
        calibration_images,
        datamodule_for,
        split_images,
        top1_accuracy,
    )
    from src.deploy.latency import (
        count_params_flops,
        measure_onnx_latency,
        ort_run,
        ort_session,
    )
    from src.deploy.onnx_export import example_input
    from src.deploy.tables import markdown_table
    from src.deploy.trained_net import load_trained_net
    from src.hpo.pareto_models import PARETO_MODELS_CSV, write_pareto_models
    from src.utils.checkpoints import checkpoint_metadata, load_checkpoint
    from src.utils.errors import AutoclsError
    from src.utils.machine import describe_machine

    sweep_dir = args.sweep_dir
    if not (sweep_dir / PARETO_MODELS_CSV).is_file():
        if not (sweep_dir / "optimization_results.yaml").is_file():
            raise AutoclsError(f"{sweep_dir} holds no optimization_results.yaml; pass the dir of a finished sweep.")
        write_pareto_models(sweep_dir)
    with open(sweep_dir / PARETO_MODELS_CSV, newline="") as f:
        front = [r for r in csv.DictReader(f) if r["model"]]
    if not front:
        raise AutoclsError(f"{sweep_dir / PARETO_MODELS_CSV} lists no exported models; run the sweep with "
                           "callbacks=latency_export (the *_prune_mo searches do).")
    trial_config = checkpoint_metadata(load_checkpoint(front[0]["checkpoint"]), front[0]["checkpoint"])["config"]
    base_ckpt = trial_config["model"]["net"].get("ckpt_path")
    if not base_ckpt:
        raise AutoclsError(f"The trials of {sweep_dir} have no model.net.ckpt_path; this script reads *_prune_mo sweeps.")
    base = load_trained_net(base_ckpt)
    datamodule = datamodule_for(base.config["data"])
    images, labels = split_images(datamodule, args.split)
    val_images, val_labels = split_images(datamodule, "val")  # the base's score where the sweep scored its trials
    example = example_input(base.input_shape, 1)

    def measure(path) -> tuple[float, dict]:
        session = ort_session(path)
        top1 = top1_accuracy(lambda x: ort_run(session, x), images, labels)
        latency = measure_onnx_latency(path, example, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
        return top1, {"latency_ms": latency.median_ms, "latency_p90_ms": latency.p90_ms}

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        variants = DeployVariants(base.net, base.input_shape, workdir,
                                  calibration=calibration_images(datamodule, args.calibration_images))
        params, flops = count_params_flops(base.net, example)
        for precision in ("fp32", "int8"):
            top1, latency = measure(variants.onnx(precision))
            session = ort_session(variants.onnx(precision))
            val_top1 = top1_accuracy(lambda x, s=session: ort_run(s, x), val_images, val_labels)
            rows.append({"model": "base", "trial": "-", "stage_ratios": "unpruned", "precision": precision,
                         "params_m": params / 1e6, "mflops": flops / 1e6, "val_top1": val_top1, "top1": top1,
                         **latency})
    ratio_keys = sorted((k for k in front[0] if k.startswith("params/model.net.stage_ratios.")),
                        key=lambda k: int(k.rsplit(".", 1)[1]))
    for row in sorted(front, key=lambda r: float(r["deploy/latency_ms"])):
        top1, latency = measure(row["model"])
        rows.append({"model": "pruned", "trial": row["number"],
                     "stage_ratios": "/".join(f"{float(row[k]):g}" for k in ratio_keys),
                     "precision": "int8" if "int8" in row["target"] else "fp32",
                     "params_m": float(row["deploy/params_m"]), "mflops": float(row["deploy/mflops"]),
                     "val_top1": float(row["deploy/acc"]), "top1": top1, **latency})
    for row in rows:
        row["speedup"] = rows[0]["latency_ms"] / row["latency_ms"]

    with open(sweep_dir / "prune_front.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, sweep_dir / "prune_front.png", f"{Path(base_ckpt).name}: {args.split} top-1 vs onnxruntime latency")
    body = [[r["model"], r["trial"], r["stage_ratios"], r["precision"], f"{r['params_m']:.3f}", f"{r['mflops']:.1f}",
             f"{100 * r['val_top1']:.2f}%", f"{100 * r['top1']:.2f}%",
             f"{r['latency_ms']:.3f}", f"{r['latency_p90_ms']:.3f}", f"{r['speedup']:.2f}x"] for r in rows]
    headers = ["model", "trial", "stage ratios", "precision", "params (M)", "MFLOPs", "val top-1",
               f"{args.split} top-1", "latency ms", "p90 ms", "speed-up vs base fp32"]
    return "\n".join([
        f"Machine: {describe_machine()}",
        f"Base: {base_ckpt}; front of {sweep_dir} ({len(front)} models); top-1 on {len(labels)} {args.split} images.",
        f"Latency: onnxruntime, batch 1, {args.threads} thread(s), median of {args.repeats} after {args.warmup} warm-up.",
        "",
        markdown_table(headers, body),
        "",
        f"Wrote {sweep_dir / 'prune_front.csv'} and {sweep_dir / 'prune_front.png'}",
    ])


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for precision, marker in (("fp32", "o"), ("int8", "s")):
        pruned = [r for r in rows if r["model"] == "pruned" and r["precision"] == precision]
        if not pruned:
            continue
        ax.scatter([r["latency_ms"] for r in pruned], [100 * r["top1"] for r in pruned], marker=marker,
                   label=f"front, {precision}")
        for r in pruned:
            ax.annotate(r["stage_ratios"], (r["latency_ms"], 100 * r["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    for r in (r for r in rows if r["model"] == "base"):
        ax.scatter([r["latency_ms"]], [100 * r["top1"]], marker="*", s=140, color="black" if r["precision"] == "fp32"
                   else "gray", label=f"base (unpruned), {r['precision']}")
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
