"""A bounded burst of POST /predict requests against a server on this machine, and its figures.

The burst is a fixed number of requests sent by `concurrency` client coroutines over kept-alive
connections; each coroutine sends its next request as soon as the previous one is answered, so at
most `concurrency` requests are in flight. Latency is measured per request at the client (send to
full response), errors are counted by kind (HTTP status or exception). Only loopback targets are
accepted: a load test must never be pointed at someone else's server by a typo.

`started_server` runs scripts/serve.py in its own process, as a user would, so the server and this
client do not share one interpreter (and its GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from src.serve.server import is_loopback
from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[2]
# bounds of one burst: enough to measure a p99, not enough to turn the script into a flood
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256


def check_loopback_url(url: str) -> str:
    """`url` without a trailing slash, or a one-sentence refusal when it is not http on loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise AutoclsError(f"--url {url!r} is not an http://host:port address; pass e.g. http://127.0.0.1:8000.")
    if not is_loopback(parts.hostname):
        raise AutoclsError(
            f"Refusing to load-test {parts.hostname}: only loopback targets (127.0.0.1, localhost, ::1) are allowed, "
            "so that a burst never leaves this machine; run the server here."
        )
    return url.rstrip("/")


def check_burst(requests: int, concurrency: int) -> None:
    if not 1 <= requests <= MAX_REQUESTS:
        raise AutoclsError(f"--requests {requests} is outside 1..{MAX_REQUESTS}; a load test is a bounded burst.")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise AutoclsError(f"--concurrency {concurrency} is outside 1..{MAX_CONCURRENCY}.")


@dataclass
class BurstResult:
    requests: int
    concurrency: int
    wall_s: float
    latencies_ms: list[float] = field(default_factory=list)  # of the successful requests
    errors: Counter = field(default_factory=Counter)  # kind -> count

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = np.percentile(lat, [50, 90, 99]) if lat.size else [float("nan")] * 3
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": int(lat.size),
            "errors": self.num_errors,
            "error_kinds": dict(self.errors),
            "wall_s": self.wall_s,
            "throughput_rps": lat.size / self.wall_s if self.wall_s > 0 else float("nan"),
            "p50_ms": float(pct[0]),
            "p90_ms": float(pct[1]),
            "p99_ms": float(pct[2]),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
            "p99_over_p50": float(pct[2] / pct[0]) if lat.size else float("nan"),
        }


async def run_burst(
    url: str, payload: bytes, filename: str, *, requests: int, concurrency: int, warmup: int = 0, timeout_s: float = 30.0
) -> BurstResult:
    """Send `requests` uploads of `payload` to `url`/predict, `concurrency` at a time (after
    `warmup` untimed ones, sent `concurrency` at a time as well)."""
    import httpx

    url = check_loopback_url(url)
    check_burst(requests, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one() -> tuple[float, str | None]:
            start = time.perf_counter()
            try:
                response = await client.post("/predict", files={"file": (filename, payload)})
                error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            return (time.perf_counter() - start) * 1000, error

        async def drive(count: int, result: BurstResult | None) -> None:
            todo = iter(range(count))  # shared by the workers; asyncio switches only at awaits

            async def worker() -> None:
                for _ in todo:
                    latency_ms, error = await one()
                    if result is None:
                        continue
                    if error is None:
                        result.latencies_ms.append(latency_ms)
                    else:
                        result.errors[error] += 1

            await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

        if warmup:
            await drive(warmup, None)
        result = BurstResult(requests=requests, concurrency=concurrency, wall_s=0.0)
        start = time.perf_counter()
        await drive(requests, result)
        result.wall_s = time.perf_counter() - start
    return result


def synthetic_png(size: int, in_chans: int, seed: int = 0) -> bytes:
    """A noise image of the model's input size (so the server's resize is a no-op), as PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size) if in_chans == 1 else (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def get_health(url: str, timeout_s: float = 5.0) -> dict:
    import httpx

    try:
        response = httpx.get(f"{check_loopback_url(url)}/health", timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise AutoclsError(f"No server answers at {url}/health ({type(err).__name__}); start one with scripts/serve.py.") from err
    return response.json()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(model_args: Sequence[str], overrides: Sequence[str] = (), startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run scripts/serve.py with `model_args` (e.g. ["ckpt_path=..."]) on a free loopback port until
    the block ends; yields its base URL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="autocls_serve_") as run_dir:
        log_path = Path(run_dir) / "server.log"
        command = [
            sys.executable, str(ROOT / "scripts" / "serve.py"), *model_args, "host=127.0.0.1", f"port={port}",
            "access_log=false", f"hydra.run.dir={run_dir}", *overrides,
        ]
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=os.getcwd())
        try:
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if process.poll() is not None:
                    raise AutoclsError(f"The server exited before answering ({_last_error(log_path)}); run scripts/serve.py by hand to see why.")
                try:
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AutoclsError(f"The server did not answer /health within {startup_timeout_s:g} s; see {log_path}.")
                time.sleep(0.2)
            yield url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["no output"])[-1]


def format_table(rows: Sequence[tuple[str, dict]]) -> str:
    header = f"{'server':<34}{'ok':>7}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99/p50':>9}"
    lines = [header, "-" * len(header)]
    for name, s in rows:
        lines.append(
            f"{name:<34}{s['ok']:>7}{s['errors']:>8}{s['throughput_rps']:>9.1f}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}"
            f"{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}{s['p99_over_p50']:>9.2f}"
        )
    return "\n".join(lines)


def goal_met(summary: dict, max_ratio: float = 3.0) -> bool:
    """The issue's goal: no errors, and p99 under `max_ratio` times p50."""
    return summary["errors"] == 0 and summary["p99_over_p50"] < max_ratio
