"""Issue 6's deployment table: batch-1 CPU latency of torch eager vs onnxruntime fp32 vs onnxruntime
INT8 at 1 and 2 threads for ResNet-18 (CIFAR stem) and timm's MobileNetV3-Large, plus the INT8
top-1 change of a model trained on the shared CIFAR-10 copy. scripts/int8_recipes.py compares INT8
recipes (quantiser options) on the same models.

    python scripts/deploy_table.py --ckpt <train.py checkpoints on data/cifar10_jpg_600> [--out docs/deploy_table.md]

The latency models have random weights (latency does not depend on the values; INT8 is calibrated on
random images for them); each checkpoint's own network is timed too, with INT8 calibrated on its
training images, and its test split gives the top-1 of fp32 and INT8 in onnxruntime. Ratios are
against eager (and INT8 against fp32) measured in the same run. Without --ckpt only the latency
table is made.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row name, configs/model/net name, overrides, image size). scripts/int8_recipes.py also times timm's
# "minimal" MobileNetV3 (no SE, no hard-swish), which quantises better; it is not a row here because its
# random-weight logits (~200 at 224px) exceed the fp32 export check's absolute tolerance.
MODELS = [
    ("ResNet-18 (CIFAR stem) 32px", "resnet_cifar", ["depth=18"], 32),
    ("MobileNetV3-Large 1.0 (timm mobilenetv3_large_100) 32px", "timm", ["model_name=mobilenetv3_large_100"], 32),
    ("MobileNetV3-Large 1.0 (timm mobilenetv3_large_100) 224px", "timm", ["model_name=mobilenetv3_large_100"], 224),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="*", default=[],
                        help="train.py checkpoints trained on the shared CIFAR-10 copy (each gets rows)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--calibration", default="auto",
                        help="INT8 activation ranges: auto (default), minmax, percentile-99.99, percentile-99.9, ...")
    parser.add_argument("--skip-models", action="store_true", help="only the checkpoint's rows")
    parser.add_argument("--ort-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="onnxruntime session config entries for every onnxruntime session, e.g. "
                             "session.dynamic_block_base=4 or session.intra_op.allow_spinning=0")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from src.utils.task import print_report, user_errors_as_messages

    print_report(user_errors_as_messages(make_table)(args), args.out)


def session_config_entries(pairs: list[str]) -> dict[str, str]:
    """`--ort-config KEY=VALUE ...` as a dict; a pair without `=` is one sentence."""
    from src.utils.errors import AutoclsError

    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise AutoclsError(f"--ort-config takes KEY=VALUE pairs (e.g. session.dynamic_block_base=4), got {', '.join(bad)}.")
    return dict(p.split("=", 1) for p in pairs)


def make_table(args: argparse.Namespace) -> str:
    import torch

    from src.deploy.deploy_report import (
        int8_accuracy,
        latency_markdown,
        latency_rows,
        training_summary,
    )
    from src.deploy.nets import build_net
    from src.utils.machine import describe_machine

    session_config = session_config_entries(args.ort_config)
    lines = [f"Machine: {describe_machine()}",
             f"Batch 1, median (p90) of {args.repeats} timed calls after {args.warmup} warm-up, per thread count."
             + (f" onnxruntime session config: {', '.join(args.ort_config)}." if args.ort_config else ""), ""]
    rows = []
    accuracies = {}
    for ckpt in args.ckpt:
        accuracy = int8_accuracy(ckpt, calibration_images=args.calibration_images, calibration_method=args.calibration)
        accuracies[ckpt] = accuracy
        rows += latency_rows(f"trained {checkpoint_name(ckpt)} (see below)", accuracy["net"], accuracy["input_shape"],
                             accuracy["calibration"], args.threads, warmup=args.warmup, repeats=args.repeats,
                             session_config=session_config)
    if not args.skip_models:
        for name, config, overrides, size in MODELS:
            net = build_net(config, overrides, num_classes=10)
            calibration = torch.randn(args.calibration_images, 3, size, size)
            rows += latency_rows(name, net, (3, size, size), calibration, args.threads,
                                 warmup=args.warmup, repeats=args.repeats, session_config=session_config)
    lines.append(latency_markdown(rows))
    for ckpt, accuracy in accuracies.items():
        summary = training_summary(ckpt)
        trained_for = (f"{summary['epochs_completed']} epochs ({summary['global_step']} optimizer steps, batch "
                       f"{summary['batch_size']}) on {accuracy['train_images']} training images of {summary['data_dir']}")
        if summary.get("train_wall_time_s") is not None:
            trained_for += f", {summary['train_wall_time_s'] / 60:.1f} min of train.py wall time"
        lines += [
            "",
            f"INT8 accuracy of {ckpt}: {summary['net']} {summary['net_config']}, trained for {trained_for}.",
            "",
            markdown_rows(accuracy),
        ]
    return "\n".join(lines)


def checkpoint_name(ckpt: str) -> str:
    """The run directory's name (`logs/deploy/<run>/checkpoints/epoch_013.ckpt` -> `<run>`)."""
    path = Path(ckpt)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def markdown_rows(accuracy: dict) -> str:
    from src.deploy.tables import markdown_table

    return markdown_table(
        ["split", "images", "eager top-1", "onnxruntime fp32 top-1", "onnxruntime INT8 top-1", "INT8 drop (points)",
         "calibration images", "ranges"],
        [[accuracy["split"], accuracy["images"], f"{100 * accuracy['eager_top1']:.2f}%",
          f"{100 * accuracy['fp32_top1']:.2f}%", f"{100 * accuracy['int8_top1']:.2f}%",
          f"{accuracy['int8_drop_points']:.2f}", accuracy["calibration_images"], accuracy["calibration_method"]]],
    )


if __name__ == "__main__":
    main()
