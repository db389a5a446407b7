"""Which onnxruntime INT8 recipe is fastest: batch-1 CPU latency of each network's fp32 graph and of
INT8 graphs made with different quantiser options, per thread count, timed interleaved, plus (with
--ckpt) each recipe's top-1 on a trained checkpoint's test split.

    python scripts/int8_recipes.py [--models resnet18_32 mnv3_32 mnv3_224 mnv3min_32 mnv3min_224]
        [--recipes default no-rewrites per-tensor ...] [--threads 1 2] [--rounds 20] [--ckpt <ckpt>]

Interleaved timing: every graph's session is built and warmed up first, then `--rounds` rounds each run
`--calls` calls of every session in turn (the order reversed every other round); a graph's figure is
the median of all its calls. Load from other processes then falls on all graphs alike, so the ratios
(against the fp32 graph, in the same rounds) stay meaningful on a busy machine; the absolute
milliseconds do not. Run it on a quiet machine for figures to quote; pin one core for 1 thread
(`taskset -c 1 python scripts/int8_recipes.py --threads 1`).

Recipes (all calibrated on the same images; `default` is what `src.deploy.quantize.quantize_onnx_static`
does; the quantiser-option recipes use min-max ranges, so they compare with `minmax`):

* default: quant_pre_process, the integer rewrites (src/deploy/qdq_rewrites.py), QDQ, uint8
  activations, int8 per-channel weights (U8S8), activation ranges by `auto` calibration (min-max,
  99.99th or 99.9th percentile: whichever INT8 graph agrees best with fp32 on the calibration images)
* minmax: the default with min-max ranges (the default before `auto`)
* no-rewrites: the same as minmax without the rewrites (onnxruntime's quantiser alone; the recipe before)
* per-tensor: one weight scale per tensor instead of per output channel
* qoperator: QOperator format (QLinearConv... written directly) instead of QDQ
* reduce-range: 7-bit weights (for CPUs without VNNI)
* s8s8: int8 activations (S8S8)
* symmetric-act: symmetric activation ranges (zero point 128)
* depthwise-fp32: depthwise convolutions (and what is not Conv/Gemm) left in fp32
* percentile, percentile-99.99, percentile-99.9, entropy: activation ranges from the 99.999th (99.99th, 99.9th)
  percentile of absolute values / by KL divergence instead of min-max
* default@extended: the default graph in a session with ORT_ENABLE_EXTENDED instead of ORT_ENABLE_ALL
  (no NCHWc/NHWC layout transformation)

fp32 rows: fp32 (dynamic batch axis, ORT_ENABLE_ALL: the baseline the deployment table uses),
fp32-fixed-batch (exported with batch 1 fixed), fp32@extended.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# key: (row name, configs/model/net name, overrides, image size)
MODELS = {
    "resnet18_32": ("ResNet-18 (CIFAR stem) 32px", "resnet_cifar", ["depth=18"], 32),
    "mnv3_32": ("MobileNetV3-Large 1.0 (timm mobilenetv3_large_100) 32px", "timm",
                ["model_name=mobilenetv3_large_100"], 32),
    "mnv3_224": ("MobileNetV3-Large 1.0 (timm mobilenetv3_large_100) 224px", "timm",
                 ["model_name=mobilenetv3_large_100"], 224),
    "mnv3min_32": ("MobileNetV3-Large minimal (timm tf_mobilenetv3_large_minimal_100) 32px", "timm",
                   ["model_name=tf_mobilenetv3_large_minimal_100"], 32),
    "mnv3min_224": ("MobileNetV3-Large minimal (timm tf_mobilenetv3_large_minimal_100) 224px", "timm",
                    ["model_name=tf_mobilenetv3_large_minimal_100"], 224),
}
INT8_RECIPES = ["default", "minmax", "no-rewrites", "per-tensor", "qoperator", "reduce-range", "s8s8", "symmetric-act",
                "depthwise-fp32", "percentile", "percentile-99.99", "percentile-99.9", "entropy", "default@extended"]
FP32_ROWS = ["fp32", "fp32-fixed-batch", "fp32@extended"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=INT8_RECIPES, choices=INT8_RECIPES)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10, help="calls per session per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calibration-images", type=int, default=None,
                        help="training images for a --ckpt (default 256, as deploy_table.py); random images for the "
                             "random-weight latency models (default 64)")
    parser.add_argument("--ckpt", default=None, help="also: each recipe's top-1 for this train.py checkpoint")
    parser.add_argument("--accuracy-only", action="store_true", help="with --ckpt: only the top-1 table")
    parser.add_argument("--profile", nargs="*", default=None, metavar="GRAPH",
                        help="also: onnxruntime's per-op profile (ms per call by op type, depthwise convolutions "
                             "apart) of these graphs (default: fp32 default no-rewrites) at the first thread count")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    from src.utils.task import print_report, user_errors_as_messages

    print_report(user_errors_as_messages(make_report)(args), args.out)


# --- building the graphs ----------------------------------------------------------------------------
def _depthwise_conv_names(fp32_path: Path, workdir: Path) -> list[str]:
    """Names of the grouped convolutions as the quantiser sees them (after its pre-processing, which
    is deterministic, so `quantize_onnx_static` finds the same names)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    prepared = workdir / "names.onnx"
    quant_pre_process(str(fp32_path), str(prepared))
    return [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def recipe_arguments(recipe: str, fp32_path: Path, workdir: Path) -> dict:
    """Keyword arguments of `quantize_onnx_static` for `recipe`."""
    from onnxruntime.quantization import QuantFormat, QuantType

    minmax = {"calibration_method": "minmax"}
    return {
        "default": {},
        "minmax": minmax,
        "no-rewrites": {"integer_rewrites": False, **minmax},
        "per-tensor": {"per_channel": False, **minmax},
        "qoperator": {"quantizer_options": {"quant_format": QuantFormat.QOperator}, **minmax},
        "reduce-range": {"quantizer_options": {"reduce_range": True}, **minmax},
        "s8s8": {"quantizer_options": {"activation_type": QuantType.QInt8}, **minmax},
        "symmetric-act": {"quantizer_options": {"extra_options": {"ActivationSymmetric": True}}, **minmax},
        "depthwise-fp32": {"quantizer_options": {
            "nodes_to_exclude": _depthwise_conv_names(fp32_path, workdir), "op_types_to_quantize": ["Conv", "Gemm"]},
            **minmax},
        "percentile": {"calibration_method": "percentile-99.999"},
        "percentile-99.99": {"calibration_method": "percentile-99.99"},
        "percentile-99.9": {"calibration_method": "percentile-99.9"},
        "entropy": {"calibration_method": "entropy"},
    }[recipe]


def build_graphs(net, input_shape: tuple[int, int, int], calibration, recipes: list[str], workdir: Path) -> dict:
    """{row name: (onnx path, optimisation level)} for the fp32 rows and `recipes`."""
    import onnxruntime as ort

    from src.deploy.onnx_export import export_onnx
    from src.deploy.quantize import quantize_onnx_static

    full, extended = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    fp32 = export_onnx(net, input_shape, workdir / "fp32.onnx")
    graphs = {"fp32": (fp32, full),
              "fp32-fixed-batch": (export_onnx(net, input_shape, workdir / "fixed.onnx", dynamic_batch=False), full),
              "fp32@extended": (fp32, extended)}
    for recipe in recipes:
        if recipe == "default@extended":
            continue
        path = quantize_onnx_static(fp32, workdir / f"{recipe}.onnx", calibration,
                                    **recipe_arguments(recipe, fp32, workdir))
        graphs[recipe] = (path, full)
    if "default@extended" in recipes:
        default = graphs.get("default", (None,))[0] or quantize_onnx_static(fp32, workdir / "default.onnx", calibration)
        graphs["default@extended"] = (default, extended)
    return graphs


# --- timing -----------------------------------------------------------------------------------------
def _session(path: Path, threads: int, level):
    import onnxruntime as ort

    options = ort.SessionOptions()  # as src.deploy.latency.ort_session, with the level as a variable
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def interleaved_medians(graphs: dict, image, threads: int, *, rounds: int, calls: int, warmup: int) -> dict[str, float]:
    """Median ms per graph of batch-1 calls timed in interleaved rounds (see the module docstring)."""
    import numpy as np

    sessions = {name: _session(path, threads, level) for name, (path, level) in graphs.items()}
    feeds = {name: {s.get_inputs()[0].name: image} for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            session, feed = sessions[name], feeds[name]
            for _ in range(calls):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in times.items()}


def op_profile(path: Path, level, image, threads: int, workdir: Path, calls: int = 100) -> dict[str, float]:
    """ms per call spent in each op type of the graph onnxruntime runs (after its fusions), from its
    own profiler (`enable_profiling`); grouped convolutions are reported as `<op> (depthwise)`."""
    import json

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(workdir / "optimised.onnx")
    options.enable_profiling, options.profile_file_prefix = True, str(workdir / "profile")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image}
    for _ in range(calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    kinds = {node.name: node.op_type + (" (depthwise)" if any(a.name == "group" and a.i > 1 for a in node.attribute)
                                        else "") for node in onnx.load(options.optimized_model_filepath).graph.node}
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kind = kinds.get(event["name"][: -len("_kernel_time")], event["args"].get("op_name", "?"))
            totals[kind] = totals.get(kind, 0.0) + event["dur"] / 1000.0 / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


# --- the report ---------------------------------------------------------------------------------------
def make_report(args: argparse.Namespace) -> str:
    import numpy as np
    import torch

    from src.deploy.nets import build_net
    from src.deploy.onnx_export import example_input
    from src.deploy.tables import markdown_table
    from src.utils.machine import describe_machine

    rows = ["fp32", *[r for r in FP32_ROWS if r != "fp32"], *args.recipes]
    lines = [f"Machine: {describe_machine()}", ""]
    if not args.accuracy_only:
        lines[1:1] = [(f"Batch 1, median ms of {args.rounds} interleaved rounds x {args.calls} calls per graph; "
                       "speed-up = fp32 (dynamic batch, ORT_ENABLE_ALL) median / this median, same rounds.")]
    models = [(MODELS[key][0], build_net(MODELS[key][1], MODELS[key][2], num_classes=10), MODELS[key][3])
              for key in args.models]
    accuracy = None
    if args.ckpt:
        accuracy, ckpt_model = checkpoint_accuracy(args)
        models.append(ckpt_model)
    if args.accuracy_only:
        models = []
    for name, net, size in models:
        calibration = (accuracy["calibration"] if accuracy is not None and net is accuracy["net"]
                       else torch.randn(args.calibration_images or 64, 3, size, size))
        image = np.ascontiguousarray(example_input((3, size, size), 1).numpy())
        with tempfile.TemporaryDirectory() as workdir:
            graphs = build_graphs(net, (3, size, size), calibration, args.recipes, Path(workdir))
            medians = {t: interleaved_medians(graphs, image, t, rounds=args.rounds, calls=args.calls,
                                              warmup=args.warmup) for t in args.threads}
            profiles = {graph: op_profile(*graphs[graph], image, args.threads[0], Path(workdir))
                        for graph in (args.profile or ["fp32", "default", "no-rewrites"]) if graph in graphs
                        } if args.profile is not None else {}
        headers = ["graph"] + [h for t in args.threads for h in (f"{t} thread{'s' * (t > 1)} ms", "speed-up vs fp32")]
        body = [[row] + [v for t in args.threads for v in (f"{medians[t][row]:.3f}",
                                                            f"{medians[t]['fp32'] / medians[t][row]:.2f}x")]
                for row in rows if row in medians[args.threads[0]]]
        lines += [f"**{name}**", "", markdown_table(headers, body), ""]
        for graph, totals in profiles.items():
            lines.append(f"Profile of {graph} ({args.threads[0]} thread(s), ms per call, {sum(totals.values()):.3f} "
                         "in kernels): " + ", ".join(f"{kind} {ms:.3f}" for kind, ms in totals.items() if ms >= 0.005))
        if profiles:
            lines.append("")
    if accuracy is not None:
        lines += [(f"Top-1 of {args.ckpt} on its test split ({accuracy['images']} images), INT8 calibrated on "
                  f"{len(accuracy['calibration'])} training images:"), "",
                  markdown_table(["graph", "top-1", "drop vs onnxruntime fp32 (points)"],
                                 [[k, f"{100 * v:.2f}%", f"{100 * (accuracy['top1']['fp32'] - v):.2f}"]
                                  for k, v in accuracy["top1"].items()]), ""]
    return "\n".join(lines).rstrip()


def checkpoint_accuracy(args: argparse.Namespace) -> tuple[dict, tuple]:
    """Top-1 of the checkpoint's fp32 graph and of each INT8 recipe on its test split (and of
    torch.ao's FX INT8 for comparison), and the checkpoint's network as a (name, net, size) latency
    model."""
    from src.deploy.images import (
        calibration_images,
        datamodule_for,
        split_images,
        top1_accuracy,
    )
    from src.deploy.latency import ort_run, ort_session
    from src.deploy.trained_net import load_trained_net

    trained = load_trained_net(args.ckpt)
    datamodule = datamodule_for(trained.config["data"])
    calibration = calibration_images(datamodule, args.calibration_images or 256)
    images, labels = split_images(datamodule, "test")
    top1 = {}
    with tempfile.TemporaryDirectory() as workdir:
        graphs = build_graphs(trained.net, trained.input_shape, calibration,
                              [r for r in args.recipes if r != "default@extended"], Path(workdir))
        for name in ["fp32", *[r for r in args.recipes if r in graphs]]:
            session = ort_session(graphs[name][0])
            top1[name] = top1_accuracy(lambda x, s=session: ort_run(s, x), images, labels)
    from src.deploy.latency import deterministic_algorithms_off
    from src.deploy.quantize import quantize_torch_fx
    from src.utils.errors import AutoclsError

    try:
        with deterministic_algorithms_off():  # quantised kernels refuse to run under it
            top1["torch.ao FX INT8 (other engine)"] = top1_accuracy(quantize_torch_fx(trained.net, calibration),
                                                                    images, labels)
    except AutoclsError as err:  # a network torch.fx cannot trace: the row says so
        print(f"(torch.ao FX INT8 skipped: {err})", file=sys.stderr)
    size = trained.input_shape[-1]
    result = {"top1": top1, "images": len(labels), "calibration": calibration, "net": trained.net}
    return result, (f"checkpoint {Path(args.ckpt).name} ({size}px)", trained.net, size)


if __name__ == "__main__":
    main()
