"""Which threads run torch with several intra-op threads: one per process at a time.

The CPU build of torch parallelises ops with OpenMP (libgomp), and libgomp gives every OS
thread that starts a parallel region its own team of worker threads. Once the teams hold
more threads than the machine has cores, libgomp stops letting idle workers spin
between regions ("throttled" waiting), so each op then pays a sleep and a wake-up. On 2
cores the demo model's forward went from 1.2 to 3.9 ms as soon as a second thread had
run one parallel op, and stayed there.

So one thread computes with several threads (the service's model threads, training's
main thread) and helper threads (the service's worker pool, push's drawing threads) run
torch single-threaded: they get their parallelism from working side by side. A team
lives as long as its thread: lowering a thread's count later does not end it, so the
service gives each model thread its count once, when the thread starts
(``service.registry.Runtime``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

# The process's intra-op thread count before the service changes any (the number of
# cores, or OMP_NUM_THREADS): the model threads' default. Read at import, on the main
# thread, because a worker's ``use_torch_threads(1)`` changes what new threads start with.
DEFAULT_TORCH_THREADS = torch.get_num_threads()


def use_torch_threads(n: int) -> None:
    """Give the calling thread ``n`` intra-op threads for good.

    torch sets up each thread's count lazily, on its first parallel op, from the
    process-wide value that the last ``set_num_threads`` anywhere left behind. Asking
    for the count first runs that set-up now, so a model thread setting its own count
    later cannot change this thread's.
    """
    torch.get_num_threads()
    torch.set_num_threads(n)


def on_scratch_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that ends with it, so the OpenMP team its torch
    ops start ends too. A benchmark or tool that builds models on its main thread and
    then serves from it would otherwise keep that team for good, and with it every model
    thread's team beside it would be throttled."""
    with ThreadPoolExecutor(1, "scratch") as pool:
        return pool.submit(fn).result()
