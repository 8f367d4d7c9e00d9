"""An asyncio micro-batcher: concurrent requests share one forward pass.

Each model has one batcher and one dedicated thread that owns the model, so the forward
never blocks the event loop and no lock is needed. While requests come together, a batch
waits at most ``max_wait`` for others to join; a lone request on an idle model goes at
once, and batches also form by themselves from what queues during a forward. The queue
is bounded, so an overloaded server answers 503 at once instead of piling up latency.

A request may bring the step that follows its forward (``then``, e.g. the maps, boxes
and JSON of an explanation). In a batch of one, with nothing else queued, it runs right
after the forward on the model thread, which saves two thread hand-offs on a model that
is not busy; otherwise each item's step runs on the worker pool, side by side, and the
model thread goes on to the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger("service.batcher")

R = TypeVar("R")
T = TypeVar("T")


class BatcherFull(Exception):
    """The queue is full; ``retry_after`` is a whole-second estimate for the client."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"{depth} images are already waiting for this model")
        self.depth, self.retry_after = depth, retry_after


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class _Item:
    x: torch.Tensor  # (3, S, S)
    future: asyncio.Future  # -> (result, whether ``then`` already ran on it)
    enqueued: float
    then: Callable[[Any], Any] | None = None


class MicroBatcher(Generic[R]):
    """Groups single inputs into batches for ``run_batch`` ((B, ...) -> B results)."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[torch.Tensor], list[R]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,  # (size, seconds)
        on_wait: Callable[[float], None] | None = None,  # seconds an item waited
        thread_init: Callable[[], None] | None = None,  # run once on the model thread
        pool: Executor | None = None,  # where ``then`` steps of larger batches run
        before_batch: Callable[[], None] | None = None,  # on the event loop, before each
    ):
        self.name = name
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.on_wait = on_batch, on_wait
        self.pool = pool
        self.before_batch = before_batch
        self.last_batch_end = time.monotonic()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{name}", initializer=thread_init
        )
        self._task: asyncio.Task | None = None
        self._closed = False
        self._batch_s = 0.05  # moving average of one batch's duration, for Retry-After
        self._current: list[_Item] = []  # the batch on the model thread right now
        self._last_size = 1  # size of the previous batch: >1 means requests come together

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def idle_for(self) -> float:
        """Seconds since the last batch ended, or 0 while one runs or items wait."""
        if self._current or self._queue.qsize():
            return 0.0
        return time.monotonic() - self.last_batch_end

    def use_thread(self, thread_init: Callable[[], None]) -> None:
        """Run on a new model thread, set up by ``thread_init``, from now on; the old one
        ends once its current work is done (call on the event loop, between batches: the
        loop awaits each batch, so the two never run one at the same time)."""
        old, self._thread = (
            self._thread,
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"model-{self.name}", initializer=thread_init
            ),
        )
        old.shutdown(wait=False)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def submit(self, x: torch.Tensor, then: Callable[[R], Any] | None = None) -> Any:
        """Queue one input and wait for its result, or for ``then(result)`` when given
        (raises BatcherFull at once if the queue is full)."""
        if self._closed:
            raise BatcherClosed(f"model {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        try:
            self._queue.put_nowait(_Item(x, fut, time.perf_counter(), then))
        except asyncio.QueueFull:
            batches_ahead = math.ceil(self.max_queue / self.max_batch)
            retry = max(1, math.ceil(batches_ahead * self._batch_s))
            raise BatcherFull(self.max_queue, retry) from None
        self.start()
        result, done = await fut
        if then is None or done:
            return result
        return await loop.run_in_executor(self.pool, then, result)

    async def on_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, between batches (a benchmark times the bare
        forward pass there, where the service runs it)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def run_now(self, x: torch.Tensor) -> list[R]:
        """Run a whole batch directly on the model thread (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.run_batch, x)

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
                if self.before_batch is not None:
                    try:
                        self.before_batch()
                    except Exception:  # the batch still runs, where it would have
                        log.exception("before_batch of model %s failed", self.name)
                await self._run(items)
            finally:
                self._current = []
                self.last_batch_end = time.monotonic()

    async def _run(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if self.on_wait:
            for it in items:
                self.on_wait(now - it.enqueued)
        xs = [it.x for it in items]
        then = items[0].then if len(items) == 1 else None

        def work() -> tuple[list[R], float, tuple[Any, BaseException | None] | None]:
            t0 = time.perf_counter()
            # Stacked here, not on the event loop: a large copy runs in parallel, and
            # only the model thread may (protopnet.threads).
            results = self.run_batch(torch.stack(xs))  # (B, 3, S, S)
            dt = time.perf_counter() - t0  # the forward's own time, for metrics
            # Only while nothing waits for the model (a racy read of the queue's length
            # from this thread; a wrong guess costs a hand-off or a short wait).
            if then is None or self._queue.qsize():
                return results, dt, None
            try:
                return results, dt, (then(results[0]), None)
            except Exception as e:  # this request's failure, not the model's
                return results, dt, (None, e)

        try:
            results, dt, finished = await loop.run_in_executor(self._thread, work)
        except Exception as e:
            log.exception("batch of %d failed on model %s", len(items), self.name)
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self._batch_s = 0.8 * self._batch_s + 0.2 * dt
        if self.on_batch:
            self.on_batch(len(items), dt)
        if finished is not None:
            value, error = finished
            if not items[0].future.done():
                if error is None:
                    items[0].future.set_result((value, True))
                else:
                    items[0].future.set_exception(error)
            return
        for it, r in zip(items, results, strict=True):
            if not it.future.done():
                it.future.set_result((r, False))

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
