"""The micro-batcher with a small fake model: grouping, bounds, errors, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.batcher import BatcherClosed, BatcherFull, MicroBatcher


class FakeModel:
    """Doubles its inputs, records batch sizes and which threads ran it."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None):
        self.delay, self.fail_on = delay, fail_on
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, xs: list[torch.Tensor]) -> list[float]:
        x = torch.stack(xs)
        self.sizes.append(x.shape[0])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("model failed")
        return [float(v) * 2 for v in x.flatten(1)[:, 0]]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_submissions_share_batches_and_get_their_own_results() -> None:
    model = FakeModel(delay=0.01)

    async def main() -> list[float]:
        b = MicroBatcher("m", model, max_batch=8, max_wait_s=0.05, max_queue=64)
        out = await asyncio.gather(*(b.submit(torch.full((3,), float(i))) for i in range(20)))
        await b.close()
        return out

    out = run(main())
    assert out == [2.0 * i for i in range(20)]
    assert max(model.sizes) == 8 and sum(model.sizes) == 20
    assert len(model.threads) == 1 and next(iter(model.threads)).startswith("model-m")


def test_a_lone_request_waits_at_most_max_wait() -> None:
    """Once requests have come together, a batch waits for stragglers, but no longer than
    max_wait: a request alone then goes after about max_wait, not later and not never."""
    model = FakeModel()
    wait_s = 0.3

    async def main() -> float:
        b = MicroBatcher("m", model, max_batch=8, max_wait_s=wait_s, max_queue=8)
        # Two together: the batcher now expects company and waits for it.
        await asyncio.gather(b.submit(torch.ones(3)), b.submit(torch.ones(3)))
        t0 = time.perf_counter()
        await b.submit(torch.ones(3))
        dt = time.perf_counter() - t0
        await b.close()
        return dt

    dt = run(main())
    assert model.sizes[-1] == 1
    assert wait_s * 0.8 <= dt <= wait_s + 0.15, f"a lone request waited {dt:.3f} s"


def test_a_lone_client_does_not_pay_the_batch_window() -> None:
    """Sequential requests from one client never wait for a batch that will not come;
    once requests arrive together, later batches wait for stragglers again."""
    model = FakeModel()

    async def main() -> tuple[list[float], list[int]]:
        b = MicroBatcher("m", model, max_batch=8, max_wait_s=0.3, max_queue=64)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            await b.submit(torch.ones(3))
            times.append(time.perf_counter() - t0)
        await asyncio.gather(*(b.submit(torch.ones(3)) for _ in range(4)))  # a burst
        late = [b.submit(torch.ones(3))]
        await asyncio.sleep(0.05)  # a straggler 50 ms later joins the next batch
        late.append(b.submit(torch.ones(3)))
        await asyncio.gather(*late)
        await b.close()
        return times, model.sizes

    times, sizes = run(main())
    assert max(times) < 0.15, times  # far below the 0.3 s window
    assert sizes[:3] == [1, 1, 1] and sizes[3] == 4 and sizes[4] == 2, sizes


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    model = FakeModel(delay=0.2)

    async def main() -> tuple[int, list]:
        b = MicroBatcher("m", model, max_batch=1, max_wait_s=0, max_queue=2)
        tasks = [asyncio.create_task(b.submit(torch.ones(3))) for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()
        return len([r for r in results if isinstance(r, float)]), results

    ok, results = run(main())
    full = [r for r in results if isinstance(r, BatcherFull)]
    assert full and ok + len(full) == 6
    assert all(e.retry_after >= 1 for e in full)


def test_a_failing_batch_fails_only_its_requests() -> None:
    model = FakeModel(fail_on=7.0)

    async def main() -> list:
        b = MicroBatcher("m", model, max_batch=1, max_wait_s=0, max_queue=8)
        out = await asyncio.gather(
            b.submit(torch.full((3,), 7.0)), b.submit(torch.full((3,), 1.0)), return_exceptions=True
        )
        await b.close()
        return out

    bad, good = run(main())
    assert isinstance(bad, RuntimeError) and good == 2.0


def test_close_finishes_queued_work_then_refuses() -> None:
    model = FakeModel(delay=0.02)

    async def main() -> tuple[list, bool]:
        b = MicroBatcher("m", model, max_batch=2, max_wait_s=0, max_queue=16)
        tasks = [asyncio.create_task(b.submit(torch.full((3,), float(i)))) for i in range(6)]
        await asyncio.sleep(0)  # all queued
        await b.close(timeout_s=5)
        done = await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await b.submit(torch.ones(3))
        except BatcherClosed:
            return done, True
        return done, False

    done, refused = run(main())
    assert done == [2.0 * i for i in range(6)] and refused


@pytest.mark.parametrize("max_batch", [1, 3])
def test_batch_sizes_never_exceed_max(max_batch: int) -> None:
    model = FakeModel(delay=0.005)

    async def main() -> None:
        b = MicroBatcher("m", model, max_batch=max_batch, max_wait_s=0.01, max_queue=64)
        await asyncio.gather(*(b.submit(torch.ones(3)) for _ in range(10)))
        await b.close()

    run(main())
    assert max(model.sizes) <= max_batch and sum(model.sizes) == 10
