"""Load-test the prediction server on this machine: a bounded burst of POST /predict requests.

    python scripts/load_test_serve.py --ckpt-path <checkpoint or last> [--requests 1000] [--concurrency 16]
    python scripts/load_test_serve.py --model-path export/model.onnx
    python scripts/load_test_serve.py --url http://127.0.0.1:8000     # a server you started yourself

With a model, the script starts scripts/serve.py itself (its own process, a free loopback port) with
request batching, then, as the baseline of the same run, a server with batching off
(max_batch_size=1), sends both the same burst and prints throughput, p50/p90/p99 latency and errors,
and the machine. Only loopback targets are accepted. The goal of the issue: 0 errors, p99 < 3x p50.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from src.serve.load_test import (
    format_table,
    get_health,
    goal_met,
    run_burst,
    started_server,
    synthetic_png,
)
from src.utils.errors import AutoclsError
from src.utils.machine import describe_machine
from src.utils.task import user_errors_as_messages


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ckpt-path", help="train.py checkpoint (or 'last') to serve")
    target.add_argument("--model-path", help="exported model.onnx (with its model.json) to serve")
    target.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per server (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests first (default 50)")
    parser.add_argument("--image", type=Path, help="the image to upload (default: noise at the model's input size)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="server batching (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching wait (default 5)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbatched server (max_batch_size=1)")
    return parser.parse_args()


def burst(url: str, payload: bytes, filename: str, args: argparse.Namespace) -> dict:
    result = asyncio.run(
        run_burst(url, payload, filename, requests=args.requests, concurrency=args.concurrency, warmup=args.warmup)
    )
    return result.summary()


def payload_for(health: dict, image: Path | None) -> tuple[bytes, str, str]:
    if image is None:
        size, chans = health["image_size"], health["in_chans"]
        return synthetic_png(size, chans), "noise.png", f"{size}x{size} noise PNG"
    if not image.is_file():
        raise AutoclsError(f"--image {image} does not exist; pass an image file or leave it out for a noise image.")
    return image.read_bytes(), image.name, str(image)


def main() -> None:
    args = parse_args()
    rows: list[tuple[str, dict]] = []
    if args.url:
        health = get_health(args.url)
        payload, filename, what = payload_for(health, args.image)
        rows.append((f"running server (batch {health['max_batch_size']})", burst(args.url, payload, filename, args)))
    else:
        model = [f"ckpt_path={args.ckpt_path}"] if args.ckpt_path else [f"model_path={args.model_path}"]
        servers = [(f"batched (max_batch_size={args.max_batch_size})", args.max_batch_size)]
        if not args.no_baseline:
            servers.append(("unbatched (max_batch_size=1)", 1))
        for name, batch in servers:
            with started_server(model, [f"max_batch_size={batch}", f"max_wait_ms={args.max_wait_ms:g}"]) as url:
                health = get_health(url)
                payload, filename, what = payload_for(health, args.image)
                rows.append((name, burst(url, payload, filename, args)))

    print(f"Machine: {describe_machine()}")
    print(
        f"Model: {health['model']} ({health['backend']}); upload: {what}, {len(payload)} bytes; "
        f"{args.requests} requests, {args.concurrency} concurrent, {args.warmup} warm-up; "
        f"server max_wait_ms={health['max_wait_ms']}"
    )
    print(format_table(rows))
    for name, summary in rows:
        if summary["errors"]:
            print(f"{name}: errors by kind {summary['error_kinds']}")
    if len(rows) == 2:
        ratio = rows[0][1]["throughput_rps"] / rows[1][1]["throughput_rps"]
        print(f"Throughput with batching: {ratio:.2f}x the unbatched server (same burst, same machine).")
    verdict = "met" if goal_met(rows[0][1]) else "NOT met"
    print(f"Goal (0 errors, p99 < 3x p50) for {rows[0][0]}: {verdict}")


if __name__ == "__main__":
    user_errors_as_messages(main)()
