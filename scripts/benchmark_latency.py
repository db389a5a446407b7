"""Latency of one network across backends, CPU thread counts and batch sizes, as a markdown table.

    python scripts/benchmark_latency.py --net resnet_cifar depth=18 --image-size 32
    python scripts/benchmark_latency.py --net timm model_name=mobilenetv3_large_100 --image-size 224
    python scripts/benchmark_latency.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt
    python scripts/benchmark_latency.py --net resnet_cifar depth=18 --backends torch inductor onnxruntime \
        onnxruntime-int8 torch-int8 inductor-int8 --threads 1 2    # INT8 engines compared (docs/deployment.md)

Backends are `<backend>[-<precision>][@<device>]`: torch, onnxruntime, onnxruntime-int8 (onnxruntime
static quantisation), torch-int8 (torch.ao FX, x86), inductor (torch.compile), inductor-int8 (torchao
PT2E + torch.compile), and on a GPU torch@cuda, torch-fp16@cuda,
onnxruntime@cuda, tensorrt@cuda, tensorrt-fp16@cuda (TensorRT through onnxruntime's provider). The
default is the CPU ones plus, when CUDA is there, the CUDA ones. Each row: median and p90 of
`--repeats` timed calls after `--warmup`, and the speed-up over torch eager on the same device with the
same batch and threads. A form that cannot be built for the network (torch.fx cannot trace it, say) is
skipped with a note under the table. INT8 calibration uses training images for --ckpt, random images for --net
(latency does not depend on the calibrated ranges).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a train.py checkpoint")
    source.add_argument("--net", nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                        help="a configs/model/net/ name and overrides, e.g. resnet_cifar depth=18")
    parser.add_argument("--image-size", type=int, default=32, help="for --net (default 32)")
    parser.add_argument("--num-classes", type=int, default=10, help="for --net (default 10)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: CPU backends (+ CUDA ones on a GPU)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32], help="batch 1 and batch N")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from src.utils.task import user_errors_as_messages

    print(user_errors_as_messages(benchmark)(args))


def benchmark(args: argparse.Namespace) -> str:
    import torch

    from src.deploy.backends import DeployVariants
    from src.deploy.benchmark import benchmark_targets, default_backends, run_benchmark
    from src.deploy.tables import latency_table
    from src.utils.machine import describe_machine

    targets = benchmark_targets(args.backends or default_backends(), args.threads, args.batch_sizes)
    needs_int8 = any(t.precision == "int8" for t in targets)
    if args.ckpt:
        from src.deploy.trained_net import load_trained_net

        trained = load_trained_net(args.ckpt)
        net, input_shape, title = trained.net, trained.input_shape, f"checkpoint {args.ckpt}"
        calibration = None
        if needs_int8:
            from src.deploy.images import calibration_images, datamodule_for

            calibration = calibration_images(datamodule_for(trained.config["data"]), args.calibration_images)
    else:
        from src.deploy.nets import build_net

        name, overrides = args.net[0], args.net[1:]
        net = build_net(name, overrides, num_classes=args.num_classes)
        input_shape = (3, args.image_size, args.image_size)
        title = f"{name} {' '.join(overrides)} at {args.image_size}x{args.image_size}, random weights"
        calibration = torch.randn(args.calibration_images, *input_shape) if needs_int8 else None

    with tempfile.TemporaryDirectory() as workdir:
        variants = DeployVariants(net, input_shape, workdir, calibration=calibration)
        rows, notes = run_benchmark(variants, targets, warmup=args.warmup, repeats=args.repeats)
    protocol = (f"{args.repeats} timed calls after {args.warmup} warm-up per row; speed-up over torch eager "
                "on the same device, batch and threads")
    lines = [f"Latency of {title}", f"Machine: {describe_machine()}", protocol, "", latency_table(rows, baseline="torch")]
    lines += [f"- {note}" for note in notes]
    text = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
