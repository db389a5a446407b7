"""The HTTP API of a trained classifier (FastAPI).

    GET  /health             -> {"status": "ok", "model": ..., "num_classes": ..., ...}
    POST /predict[?topk=k]   multipart/form-data with the image in the field `file`
                             -> {"predictions": [{"class_index", "label", "probability"}, ...],
                                 "filename": ..., "batch_size": <requests sharing the forward pass>}

Every failure answers with one line of JSON, `{"error": "<sentence>"}`, and a status code: 400 for
a body that is not a readable image (non-image, truncated, empty, no `file` field), 413 for an upload
over `max_upload_mb`, 415 for a body that is not a form, 404/405/422 for wrong routes, methods and
query values. A bad request only ever fails itself: decoding happens per request, before batching,
so one corrupt upload never spoils the batch it would have joined.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from src.datamodules.image_files import _short_error
from src.deploy.predictor import Predictor
from src.serve.batching import BatchQueue

log = logging.getLogger(__name__)

FIELD = "file"
# a body this many times over the limit is not read to its end before the 413 (see UploadLimit)
_DRAIN_FACTOR = 4


def create_app(
    predictor: Predictor,
    *,
    topk: int = 5,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 10.0,
) -> FastAPI:
    """The app serving `predictor`; batching starts and stops with the app's lifespan."""
    default_topk = predictor.check_topk(topk)
    batches = BatchQueue(lambda items: _predict_batch(predictor, items), max_batch_size, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batches.start()
        # the first forward pass allocates and picks kernels: pay for it before the first request
        blank = torch.zeros((predictor.in_chans, predictor.image_size, predictor.image_size), dtype=torch.uint8)
        await batches.submit((blank, 1))
        # everything loaded so far (torch, the model, the app) lives as long as the server: moving it
        # out of the garbage collector's reach keeps full collections, and latency spikes, short
        gc.collect()
        gc.freeze()
        log.info(f"Serving {predictor.source} ({predictor.backend_name}, {predictor.num_classes} classes)")
        yield
        await batches.stop()

    app = FastAPI(title="autocls classifier", lifespan=lifespan)
    app.add_middleware(UploadLimit, max_mb=max_upload_mb)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": predictor.source,
            "backend": predictor.backend_name,
            "num_classes": predictor.num_classes,
            "image_size": predictor.image_size,
            "in_chans": predictor.in_chans,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_upload_mb": max_upload_mb,
        }

    @app.post("/predict")
    async def predict(request: Request, topk: int | None = None) -> JSONResponse:
        k = default_topk if topk is None else topk
        if not 1 <= k <= predictor.num_classes:
            raise HTTPException(400, f"topk={k} is outside 1..{predictor.num_classes}; ask for 1 to {predictor.num_classes} classes.")
        upload = await _read_upload(request)
        data = await upload.read()
        if not data:
            raise HTTPException(400, f"The uploaded file {upload.filename!r} is empty; send an image file.")
        try:
            # decoding is CPU work: off the event loop, which keeps accepting requests
            image = await run_in_threadpool(predictor.load_image, data)
        except Exception as exc:  # noqa: BLE001 - PIL signals bad images with many exception types
            raise HTTPException(
                400, f"The uploaded file {upload.filename!r} is not a readable image ({_image_error(exc)}); send a JPEG, PNG, ... file."
            ) from None
        predictions, batch_size = await batches.submit((image, k))
        # a plain JSONResponse: the body is already JSON-ready, FastAPI's response-model pass would only cost time
        return JSONResponse({"predictions": predictions, "filename": upload.filename, "batch_size": batch_size})

    return app


def _predict_batch(predictor: Predictor, items: list[tuple[torch.Tensor, int]]) -> list[list[dict]]:
    """One forward pass for the whole batch; each request gets its own top-k."""
    images = torch.stack([image for image, _ in items])
    ranked = predictor.predict(images, topk=max(k for _, k in items))
    return [
        [{"class_index": p.class_index, "label": p.label, "probability": p.probability} for p in row[:k]]
        for row, (_, k) in zip(ranked, items)
    ]


async def _read_upload(request: Request):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            415,
            f"Send the image as multipart/form-data in the field '{FIELD}' (got {content_type or 'no content type'}), "
            f"e.g. curl -F {FIELD}=@image.jpg http://host:port/predict.",
        )
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get(FIELD)
    if upload is None:
        fields = ", ".join(sorted(set(form.keys()))) or "none"
        raise HTTPException(400, f"The form has no field '{FIELD}' (fields: {fields}); send the image as '{FIELD}'.")
    if isinstance(upload, str):
        raise HTTPException(400, f"The form field '{FIELD}' holds text, not a file; upload the image file in it.")
    return upload


def _image_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its message names an in-memory buffer, not the upload
        return "not in an image format PIL recognises"
    return _short_error(exc)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": "<one line>"}` (FastAPI's defaults are `{"detail": ...}` structures)."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail
        if exc.status_code in (404, 405):  # the router's bare "Not Found" / "Method Not Allowed"
            message = f"{exc.detail}: {request.method} {request.url.path}; the API is GET /health and POST /predict."
        return JSONResponse({"error": _one_line(message)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": _one_line(f"Invalid request ({problems}).")}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": _one_line(f"Internal server error ({type(exc).__name__}); see the server log.")}, status_code=500)


class UploadLimit:
    """ASGI middleware: request bodies over `max_mb` MiB get a 413 before the app parses them.

    A body whose Content-Length is over the limit is refused without buffering it; one without a
    length (chunked) is counted as it arrives. Either way the rest of an oversized body is read and
    dropped (up to `_DRAIN_FACTOR` times the limit) before answering, because answering while the
    client is still sending makes many clients see a reset connection instead of the 413.
    """

    def __init__(self, app, max_mb: float) -> None:
        self.app, self.max_mb, self.max_bytes = app, max_mb, int(max_mb * 2**20)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, already=0)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                if more:
                    await self._refuse(scope, receive, send, already=len(body))
                else:
                    await self._send_413(scope, send)
                return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, already: int) -> None:
        dropped, more = already, True
        while more and dropped <= _DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        await self._send_413(scope, send)

    async def _send_413(self, scope, send) -> None:
        response = JSONResponse(
            {"error": f"The upload is larger than the server's limit of {self.max_mb:g} MB; send a smaller image."},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
