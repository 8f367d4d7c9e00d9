"""An asyncio micro-batcher: concurrent requests share one forward pass.

Each model has one batcher and one dedicated thread that owns the model, so the forward
never blocks the event loop and no lock is needed. While requests come together, a batch
waits at most ``max_wait`` for others to join; a lone request on an idle model goes at
once, and batches also form by themselves from what queues during a forward. The queue
is bounded, so an overloaded server answers 503 at once instead of piling up latency.

The model thread runs ``run_batch`` and nothing else: whatever a request does after its
forward runs on the caller's side (the worker pool), so the next batch never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("service.batcher")

I = TypeVar("I")  # noqa: E741  # one request's input
R = TypeVar("R")  # its result
T = TypeVar("T")


class BatcherFull(Exception):
    """The queue is full; ``retry_after`` is a whole-second estimate for the client."""

    def __init__(self, name: str, depth: int, retry_after: int):
        super().__init__(f"{depth} images are already waiting for model {name}")
        self.depth, self.retry_after = depth, retry_after


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class _Item(Generic[I]):
    value: I
    future: asyncio.Future
    enqueued: float


class MicroBatcher(Generic[I, R]):
    """Groups single inputs into batches for ``run_batch`` (B inputs -> B results)."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[I]], list[R]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,  # (size, seconds)
        on_wait: Callable[[float], None] | None = None,  # seconds an item waited
        thread_init: Callable[[], None] | None = None,  # run once on the model thread
    ):
        self.name = name
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.on_wait = on_batch, on_wait
        self._queue: asyncio.Queue[_Item[I]] = asyncio.Queue(maxsize=max_queue)
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{name}", initializer=thread_init
        )
        self._task: asyncio.Task | None = None
        self._closed = False
        self._batch_s = 0.05  # moving average of one batch's duration, for Retry-After
        self._current: list[_Item[I]] = []  # the batch on the model thread right now
        self._last_size = 1  # size of the previous batch: >1 means requests come together

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def submit(self, value: I) -> R:
        """Queue one input and wait for its result (raises BatcherFull at once if the
        queue is full)."""
        if self._closed:
            raise BatcherClosed(f"model {self.name} is shutting down")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(value, fut, time.perf_counter()))
        except asyncio.QueueFull:
            batches_ahead = math.ceil(self.max_queue / self.max_batch)
            retry = max(1, math.ceil(batches_ahead * self._batch_s))
            raise BatcherFull(self.name, self.max_queue, retry) from None
        self.start()
        return await fut

    async def on_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, between batches (warm-up; a benchmark times
        the bare forward pass there, where the service runs it)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            items = [first]
            # Wait up to max_wait for others only while requests are arriving together
            # (the last batch held more than one): a lone client is served at once
            # instead of paying the whole window on every request.
            wait_s = self.max_wait_s if self._last_size > 1 else 0.0
            deadline = loop.time() + wait_s
            while len(items) < self.max_batch:
                # Take what is already queued without waiting, then wait for the rest.
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            items = [it for it in items if not it.future.cancelled()]
            if not items:
                continue
            self._current = items
            self._last_size = len(items)
            try:
                await self._run(items)
            finally:
                self._current = []

    async def _run(self, items: list[_Item[I]]) -> None:
        now = time.perf_counter()
        if self.on_wait:
            for it in items:
                self.on_wait(now - it.enqueued)
        values = [it.value for it in items]

        def work() -> tuple[list[R], float]:
            t0 = time.perf_counter()
            results = self.run_batch(values)
            return results, time.perf_counter() - t0

        try:
            results, dt = await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except Exception as e:
            log.exception("batch of %d failed on model %s", len(items), self.name)
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self._batch_s = 0.8 * self._batch_s + 0.2 * dt
        if self.on_batch:
            self.on_batch(len(items), dt)
        for it, r in zip(items, results, strict=True):
            if not it.future.done():
                it.future.set_result(r)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, finish what is queued (graceful shutdown), stop the thread."""
        self._closed = True
        t_end = time.monotonic() + timeout_s
        while (
            (self._queue.qsize() or self._current)
            and time.monotonic() < t_end
            and self._task is not None
        ):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        leftover = list(self._current)
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for it in leftover:
            if not it.future.done():
                it.future.set_exception(BatcherClosed(f"model {self.name} shut down"))
        self._thread.shutdown(wait=True)
