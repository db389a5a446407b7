"""The prediction server, over real HTTP on 127.0.0.1: good requests get the predictor's answer,
every kind of bad request gets a 4xx with a one-line JSON error, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from src.deploy.predictor import Predictor
from src.serve.app import create_app
from src.serve.batching import BatchQueue
from src.serve.load_test import check_loopback_url, run_burst
from src.serve.server import check_port_free
from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 0.05  # 52 KB: an oversized upload stays cheap to send
MAX_WAIT_MS = 100  # long enough that concurrent test requests share a batch on a busy CPU


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy(), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor(digits_ckpt) -> Predictor:
    return Predictor.load(digits_ckpt)


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    """Twelve distinct 8x8 digits as uint8 (N, 1, 8, 8), as the digits data module stores them."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:12] * (255 / 16)
    return torch.from_numpy(np.round(images).astype(np.uint8)).unsqueeze(1)


@pytest.fixture(scope="module")
def server(predictor):
    """The app under uvicorn in a background thread, on a socket bound to 127.0.0.1:<free port>."""
    app = create_app(predictor, topk=5, max_batch_size=8, max_wait_ms=MAX_WAIT_MS, max_upload_mb=MAX_UPLOAD_MB)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=10) as c:
        yield c


def assert_still_serving(client, image: bytes) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", files={"file": ("ok.png", image)}).status_code == 200


# --- good requests ---------------------------------------------------------------------------------
def test_health(client, predictor):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["num_classes"] == 10 and body["backend"] == "torch"
    assert (body["image_size"], body["in_chans"], body["max_batch_size"]) == (8, 1, 8)


def test_predict_returns_the_predictors_topk(client, predictor, digit_images):
    response = client.post("/predict", files={"file": ("three.png", png_bytes(digit_images[3]), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == "three.png" and body["batch_size"] >= 1
    expected = predictor.predict(digit_images[3:4], topk=5)[0]
    got = body["predictions"]
    assert [p["class_index"] for p in got] == [p.class_index for p in expected]
    assert [p["label"] for p in got] == [p.label for p in expected]
    assert [p["probability"] for p in got] == pytest.approx([p.probability for p in expected], abs=1e-6)
    assert [p["probability"] for p in got] == sorted((p["probability"] for p in got), reverse=True)

    top2 = client.post("/predict?topk=2", files={"file": ("three.png", png_bytes(digit_images[3]))}).json()
    assert [p["class_index"] for p in top2["predictions"]] == [p.class_index for p in expected[:2]]
    everything = client.post("/predict?topk=10", files={"file": ("three.png", png_bytes(digit_images[3]))}).json()
    assert sum(p["probability"] for p in everything["predictions"]) == pytest.approx(1.0, abs=1e-9)


def test_concurrent_requests_share_forward_passes(server, predictor, digit_images):
    """Twelve requests at once: all answered correctly, and some of them in one batch."""
    uploads = [png_bytes(image) for image in digit_images]

    async def send_all():
        async with httpx.AsyncClient(base_url=server, timeout=20) as c:
            return await asyncio.gather(*(c.post("/predict", files={"file": (f"{i}.png", b)}) for i, b in enumerate(uploads)))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(uploads)
    expected = predictor.predict(digit_images, topk=5)
    for response, want in zip(responses, expected):
        got = response.json()["predictions"]
        assert [p["class_index"] for p in got] == [p.class_index for p in want]
        assert [p["probability"] for p in got] == pytest.approx([p.probability for p in want], abs=1e-6)
    assert max(r.json()["batch_size"] for r in responses) > 1


def test_batch_queue_groups_up_to_max_and_maps_results_back():
    calls = []

    def run(items):
        calls.append(list(items))
        return [10 * x for x in items]

    async def main():
        queue = BatchQueue(run, max_batch_size=4, max_wait_ms=50)
        await queue.start()
        try:
            return await asyncio.gather(*(queue.submit(i) for i in range(10)))
        finally:
            await queue.stop()

    results = asyncio.run(main())
    assert [r for r, _ in results] == [10 * i for i in range(10)]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [size for _, size in results] == [4] * 8 + [2] * 2


def test_batch_queue_error_reaches_its_batch_only():
    def run(items):
        if -1 in items:
            raise ValueError("bad batch")
        return items

    async def main():
        queue = BatchQueue(run, max_batch_size=4, max_wait_ms=20)
        await queue.start()
        try:
            failed = await asyncio.gather(queue.submit(-1), queue.submit(2), return_exceptions=True)
            return failed, await queue.submit(3)
        finally:
            await queue.stop()

    failed, later = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in failed)
    assert later == (3, 1)


# --- bad requests ----------------------------------------------------------------------------------
def _truncated_png(image: bytes) -> bytes:
    return image[: len(image) // 2]


def _chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


BAD_REQUESTS = {
    # name: (method, path, request kwargs (built from a good PNG), status, fragment of the error)
    "text file": ("POST", "/predict", lambda png: {"files": {"file": ("notes.txt", b"just some text")}}, 400, "not a readable image"),
    "truncated png": ("POST", "/predict", lambda png: {"files": {"file": ("t.png", _truncated_png(png))}}, 400, "truncated"),
    "corrupt jpeg": ("POST", "/predict", lambda png: {"files": {"file": ("c.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64)}}, 400, "not a readable image"),
    "empty file": ("POST", "/predict", lambda png: {"files": {"file": ("e.png", b"")}}, 400, "is empty"),
    "wrong field": ("POST", "/predict", lambda png: {"files": {"image": ("x.png", png)}}, 400, "no field 'file' (fields: image)"),
    "text field": ("POST", "/predict", lambda png: {"files": {"other": ("x.png", png)}, "data": {"file": "abc"}}, 400, "holds text, not a file"),
    "no body": ("POST", "/predict", lambda png: {}, 415, "multipart/form-data"),
    "raw image body": ("POST", "/predict", lambda png: {"content": png, "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
    "two files": ("POST", "/predict", lambda png: {"files": [("file", ("a.png", png)), ("file", ("b.png", png))]}, 400, "Too many files"),
    "broken multipart": ("POST", "/predict", lambda png: {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, ""),
    "oversized": ("POST", "/predict", lambda png: {"files": {"file": ("big.png", os.urandom(200_000))}}, 413, "limit of 0.05 MB"),
    "oversized chunked": ("POST", "/predict", lambda png: {"content": _chunks(os.urandom(200_000)), "headers": {"content-type": "multipart/form-data; boundary=x"}}, 413, "limit"),
    "bad topk": ("POST", "/predict?topk=0", lambda png: {"files": {"file": ("x.png", png)}}, 400, "topk=0 is outside 1..10"),
    "non-integer topk": ("POST", "/predict?topk=abc", lambda png: {"files": {"file": ("x.png", png)}}, 422, "query.topk"),
    "unknown route": ("GET", "/nope", lambda png: {}, 404, "GET /nope; the API is GET /health and POST /predict"),
    "wrong method": ("GET", "/predict", lambda png: {}, 405, "Method Not Allowed"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_one_line_json_error_and_server_keeps_serving(client, digit_images, name):
    method, path, make_kwargs, status, fragment = BAD_REQUESTS[name]
    good = png_bytes(digit_images[0])
    response = client.request(method, path, **make_kwargs(good))
    assert response.status_code == status, response.text
    assert "\n" not in response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert fragment in body["error"]
    assert_still_serving(client, good)


# --- the command-line server, the load test, option checks -----------------------------------------
def test_load_test_burst_against_the_server(server):
    result = asyncio.run(run_burst(server, png_bytes(torch.zeros(1, 8, 8, dtype=torch.uint8)), "z.png",
                                   requests=40, concurrency=4, warmup=4))
    summary = result.summary()
    assert summary["errors"] == 0 and summary["ok"] == 40
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["throughput_rps"] == pytest.approx(40 / result.wall_s)


def test_load_test_script_starts_serve_cli_and_measures(digits_ckpt):
    """scripts/load_test_serve.py with a checkpoint runs scripts/serve.py (the real command line) on a
    free loopback port, sends a small burst and prints the table with the machine."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test_serve.py"), "--ckpt-path", str(digits_ckpt),
         "--requests", "30", "--concurrency", "3", "--warmup", "3", "--no-baseline"],
        check=False, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Machine: ") and "cores" in lines[0]
    assert f"Model: {digits_ckpt} (torch)" in result.stdout
    row = next(line for line in lines if line.startswith("batched (max_batch_size=16)"))
    assert row.split()[2:4] == ["30", "0"]  # ok, errors
    assert "Goal (0 errors, p99 < 3x p50)" in result.stdout


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com", "https://127.0.0.1:8000", "127.0.0.1:8000"])
def test_load_test_refuses_non_loopback_targets(url):
    with pytest.raises(AutoclsError) as err:
        check_loopback_url(url)
    assert "\n" not in str(err.value)
    assert check_loopback_url("http://localhost:8000/") == "http://localhost:8000"


def test_port_in_use_is_one_sentence():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(AutoclsError, match="already in use; pass port="):
            check_port_free("127.0.0.1", sock.getsockname()[1])
    with pytest.raises(AutoclsError, match="is not a port number"):
        check_port_free("127.0.0.1", 70000)


def test_error_bodies_are_valid_single_line_json(client):
    """The 413 is written by the size-limit middleware itself, outside FastAPI's handlers."""
    response = client.post("/predict", files={"file": ("big.png", b"\x00" * 100_000)})
    assert response.status_code == 413
    assert json.loads(response.text) == {"error": "The upload is larger than the server's limit of 0.05 MB; send a smaller image."}
