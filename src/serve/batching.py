"""Dynamic request batching: single requests in, one forward pass per batch.

A network answers a batch of 16 images in far less than 16 times the time of one, so a server that
runs each request on its own wastes most of the CPU on per-call overhead. `BatchQueue` lets request
handlers `await submit(item)`; one consumer task takes the first waiting item, collects more for up
to `max_wait_ms` (or until `max_batch_size`), and runs `run_batch` on all of them in a worker thread,
so the event loop keeps accepting and decoding requests meanwhile. While a batch runs, the next one
fills up, so under load batches grow by themselves and a lone request waits at most `max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class BatchQueue:
    """Collects items submitted by concurrent coroutines into batches for `run_batch`.

    Args:
        run_batch: Maps a list of items to a list of results in the same order; runs in one worker
            thread, so calls never overlap (a network is not shared between threads).
        max_batch_size: Most items per call.
        max_wait_ms: How long the first item of a batch waits for others to join it.
    """

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch_size: int = 16, max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_wait_ms={max_wait_ms} >= 0")
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._consumer: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._consumer = asyncio.create_task(self._consume(), name="batch-consumer")

    async def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():  # nobody will run these now
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._consumer = self._executor = None

    async def submit(self, item: Any) -> tuple[Any, int]:
        """The result for `item` and the size of the batch it ran in; re-raises what `run_batch` raised."""
        if self._consumer is None or self._consumer.done():
            raise RuntimeError("BatchQueue is not running; call start() first")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():  # already waiting: take it without a timer
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        # a client that gave up (its handler was cancelled) needs no forward pass
        return [(item, future) for item, future in batch if not future.done()]

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
            except Exception as exc:  # every waiting request gets the error; the loop goes on
                log.exception("Batch of %d failed", len(items))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result((result, len(batch)))
