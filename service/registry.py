"""Models served by this replica: loaded from the store, warmed up, one batcher each.

References resolve through the store on every request (so a promoted alias takes effect
at once); a resolved version is loaded on first use and kept, least recently used first
out, up to ``max_loaded_models``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from model_store import LoadedModel, ModelStore
from protopnet.explain import PrototypeExplainer
from protopnet.threads import DEFAULT_TORCH_THREADS, CoreBudget, use_torch_threads
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("service.registry")


@dataclass
class ForwardResult:
    """One image's share of a batched forward pass, on the CPU."""

    logits: torch.Tensor  # (K,)
    min_distances: torch.Tensor  # (P,)
    sim_maps: torch.Tensor  # (P, H', W') similarity maps before pooling


def pick_device(setting: str) -> torch.device:
    """ "auto": CUDA when present, else CPU; otherwise the named device. A GPU is named
    with its index ("cuda" -> "cuda:0"), as /readyz reports it."""
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting
    )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# A model whose batcher has been idle this long gives its cores to one that wants them.
CORES_IDLE_S = 2.0


def choose_torch_threads(one_s: float, many_s: float, many: int) -> int:
    """Intra-op threads for a model thread, from its forward time with 1 and ``many``.

    Threads spent on a forward are taken from everything else a request needs (decoding,
    maps, JSON, other requests' work), so the model gets them only if they pay: the
    forward must run at least 1 + (many - 1) / 2 times faster with them, i.e. each extra
    core must give at least half a core's worth. A small model keeps one thread: on 2
    cores the demo model's forward was 1.0-1.4x faster with 2 (2.2 or 1.6 ms against
    2.3 ms in NCHW, 1.03 against 1.31 ms in channels-last), while VGG-19's is 1.8x faster.
    """
    return many if one_s >= many_s * (1 + (many - 1) / 2) else 1


def settle_heap() -> None:
    """Keep the garbage collector's full passes off the request path.

    Loading torch, the web stack and a model leaves some 400 000 long-lived objects that
    CPython's oldest generation rescans now and then; on 2 cores one such pass took
    210 ms, stalling every request in flight (the p99 of the 16-client benchmark). Frozen
    objects are never scanned. Called after each load and unload: unfreezing first lets
    an unloaded model's reference cycles be collected rather than kept for good.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServedModel:
    """A loaded version: the model on its device, its explainer and its batcher."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        metrics: Metrics,
        pool: Executor | None,
        cores: CoreBudget | None = None,
        trials: asyncio.Lock | None = None,  # one thread trial at a time
    ):
        self.loaded = loaded
        self.manifest = loaded.manifest
        self.name, self.version = loaded.manifest.name, loaded.manifest.version
        self.ref = f"{self.name}@{self.version}"
        self.manifest_sha256 = loaded.manifest_sha256
        self.device = pick_device(settings.device)
        if self.device.type == "cuda":  # a process-wide flag, the same for every model
            # Convolutions only (the trunk, the add-on layers): matrix products, the
            # prototype distances among them, keep PyTorch's true float32 default.
            torch.backends.cudnn.allow_tf32 = settings.allow_tf32
        self.model = loaded.model.to(self.device).eval()
        self.memory_format = (
            torch.channels_last if settings.channels_last else torch.contiguous_format
        )
        self.model.to(memory_format=self.memory_format)
        self.preprocessing = loaded.manifest.preprocessing
        self.class_names = list(loaded.manifest.class_names)
        self.prototype_classes: list[int] = self.model.prototype_classes.cpu().tolist()
        self.explainer = PrototypeExplainer(
            self.model, self.preprocessing, settings.max_map_side, frozen=True
        )
        # Per class, the indices of its own prototypes (the scoring sheets' rows).
        self.prototypes_of_class = self.explainer.prototypes_of_class
        # Only this model's thread runs torch with several threads (protopnet.threads).
        # Unset on a CPU: it starts with one and warm-up times whether more pay
        # (``choose_torch_threads``); it has them while no other model's team holds the
        # cores (``cores``, shared by the registry's models; see ``_grow``).
        self.cores = cores if cores is not None else CoreBudget()
        self.trials = trials if trials is not None else asyncio.Lock()
        self.auto_threads = settings.torch_threads is None and self.device.type == "cpu"
        self.torch_threads = (
            1 if self.auto_threads else settings.torch_threads or DEFAULT_TORCH_THREADS
        )
        self.wanted_threads = self.torch_threads
        self._in_trial = False  # timing its threads at warm-up: its cores are not taken
        self.batcher: MicroBatcher[ForwardResult] = MicroBatcher(
            self.ref,
            self._run_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=lambda n, dt: self._on_batch(metrics, n, dt),
            on_wait=lambda s: metrics.queue_wait.labels(self.ref).observe(s),
            thread_init=lambda: use_torch_threads(self.torch_threads),
            pool=pool,
            before_batch=self._grow if self.auto_threads else None,
        )
        self._metrics = metrics

    def _on_batch(self, metrics: Metrics, n: int, dt: float) -> None:
        metrics.batch_size.labels(self.ref).observe(n)
        metrics.forward.labels(self.ref).observe(dt)
        metrics.queue_depth.labels(self.ref).set(self.batcher.depth)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch (B, 3, S, S) on the model's device, in its layout."""
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True)

    @torch.inference_mode()
    def _run_batch(self, x: torch.Tensor) -> list[ForwardResult]:
        """(B, 3, S, S) -> B results. Runs on the model's own thread only."""
        out = self.model.forward_full(self.model_input(x))
        # In the model's layout; the explainer makes each image's maps row-major, on the
        # worker that finishes it when the batch holds several (not on this thread).
        sims = self.model.similarity(out.distances).float().cpu()  # (B, P, H', W')
        logits = out.logits.float().cpu()  # (B, K)
        min_d = out.min_distances.float().cpu()  # (B, P)
        return [ForwardResult(logits[b], min_d[b], sims[b]) for b in range(x.shape[0])]

    async def forward(
        self, x: torch.Tensor, then: Callable[[ForwardResult], Any] | None = None
    ) -> Any:
        """One preprocessed image (3, S, S) through the batcher: its ForwardResult, or
        ``then`` of it (on the model thread when x was batched alone and nothing else
        waits, else on the worker pool; see ``service.batcher``)."""
        self._metrics.queue_depth.labels(self.ref).set(self.batcher.depth + 1)
        return await self.batcher.submit(x, then)

    async def warm_up(self, max_batch: int) -> float:
        """Run batches of 1 and of the max size once, so the first request is not slow;
        then pick the model thread's torch threads if the settings leave it open."""
        t0 = time.perf_counter()
        S = self.preprocessing.img_size
        if self.device.type == "cpu" and not self.auto_threads:
            # A count the operator set is used as it is, and counted against the others.
            self.cores.take(self, self.torch_threads, insist=True)
        for b in sorted({1, min(2, max_batch), max_batch}):
            await self.batcher.run_now(torch.zeros(b, 3, S, S))
        if self.auto_threads and DEFAULT_TORCH_THREADS > 1:
            await self._pick_threads(torch.zeros(1, 3, S, S))
        self.batcher.start()
        return time.perf_counter() - t0

    async def _pick_threads(self, x: torch.Tensor) -> None:
        """Time a lone image's forward with one thread and with the spare cores,
        alternately, and want the better use of them (``choose_torch_threads``); the
        model thread then has them while no other model holds them (``_grow``).

        The trial needs the cores to itself: next to another model's team the forwards
        with several threads are throttled (a ResNet-50's went from 69 to 117 ms, which
        would have chosen one thread). So it takes them from models not running a batch
        at this moment; with all of them busy, the model runs on one thread untried.
        The model thread runs with one thread throughout; the forwards with more run on
        a scratch thread that ends afterwards, because an OpenMP team lives as long as
        its thread and one left behind would throttle every other model's.
        """
        async with self.trials:  # two models loading at once: one trial, then the other
            await self._pick_threads_alone(x)

    async def _pick_threads_alone(self, x: torch.Tensor) -> None:
        self._in_trial = True
        try:
            self._reclaim_cores(idle_s=0.0)
            many = self.cores.take(self, DEFAULT_TORCH_THREADS)  # held during the trial
            if many == 1:
                log.info(
                    "%s: other models are busy on the other cores: using 1 torch thread, "
                    "untried", self.ref,
                )  # fmt: skip
                return
            one, all_ = await self._trial(x, many)
        finally:
            self._in_trial = False
            self.cores.give_back(self)
        self.wanted_threads = choose_torch_threads(one, all_, many)
        self._grow()
        if self.torch_threads > 1:  # the team forms now, not on the first request
            await self.batcher.run_now(x)
        log.info(
            "%s: forward of one image %.2f ms with 1 torch thread, %.2f ms with %d: using %d",
            self.ref, one * 1e3, all_ * 1e3, many, self.torch_threads,
        )  # fmt: skip

    async def _trial(self, x: torch.Tensor, many: int) -> tuple[float, float]:
        """Fastest forward with 1 thread (model thread) and ``many`` (scratch thread)."""
        times: dict[int, list[float]] = {1: [], many: []}

        def timed(n: int) -> None:
            t = time.perf_counter()
            self._run_batch(x)
            times[n].append(time.perf_counter() - t)

        loop = asyncio.get_running_loop()
        # Small models get 7 rounds, a VGG-19 2 (4 forwards of each kind, about 2.5 s on
        # 2 cores). With one round, a slow sample on a busy machine can give it 1 thread
        # and a forward about twice as slow for as long as it stays loaded (once seen in
        # bench.explain_latency: 465 ms in one phase, 223 ms in the other).
        deadline = time.perf_counter() + 1.0
        with ThreadPoolExecutor(1, "threads-trial", use_torch_threads, (many,)) as scratch:
            for rnd in range(7):
                for n in (1, many, 1, many):
                    if n == 1:
                        await self.batcher.on_thread(functools.partial(timed, 1))
                    else:
                        await loop.run_in_executor(scratch, timed, many)
                if rnd >= 1 and time.perf_counter() > deadline:
                    break
        return min(times[1]), min(times[many])

    def _use_threads(self, n: int) -> None:
        """Move the model to a new thread with ``n`` torch threads (between batches)."""
        self.torch_threads = n
        self.batcher.use_thread(lambda: use_torch_threads(n))

    def _grow(self) -> None:
        """Before a batch (on the event loop): a model with fewer threads than warm-up
        found worth having takes the spare cores, or those of a model idle for
        ``CORES_IDLE_S``. A model that served within that time keeps its own, so two busy
        models share the cores without throttling each other."""
        if self.torch_threads >= self.wanted_threads:
            return
        if self.cores.free() < self.wanted_threads - self.torch_threads:
            self._reclaim_cores(idle_s=CORES_IDLE_S)
        n = self.cores.take(self, self.wanted_threads)
        if n != self.torch_threads:
            log.info("%s: now %d torch threads (wants %d)", self.ref, n, self.wanted_threads)
            self._use_threads(n)

    def _reclaim_cores(self, idle_s: float) -> None:
        """Move other models that hold cores and ran no batch for ``idle_s`` to one thread."""
        for other in list(self.cores.held):
            if (
                isinstance(other, ServedModel)
                and other is not self
                and other.auto_threads
                and not other._in_trial
                and other.batcher.idle_for() > idle_s
            ):
                log.info("%s: not busy, its cores go to %s", other.ref, self.ref)
                self.cores.give_back(other)
                other._use_threads(1)

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)  # its thread, and so its team, has ended
        self.cores.give_back(self)


class ModelRegistry:
    """Resolves references through the store and keeps loaded versions."""

    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        metrics: Metrics,
        pool: Executor | None = None,  # the worker pool: post-forward steps of batches
    ):
        self.store, self.settings, self.metrics, self.pool = store, settings, metrics, pool
        self._models: OrderedDict[str, ServedModel] = OrderedDict()
        self.cores = CoreBudget()  # what the models' threads may spread over
        self.trials = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self.ready = False
        self.error: str | None = None  # the start-up failures, one line
        self.failures: dict[str, str] = {}  # start-up ref -> last error
        self._failed: dict[str, tuple[float, Exception]] = {}  # name@version -> (when, error)

    @property
    def loaded_refs(self) -> list[str]:
        return list(self._models)

    @property
    def devices(self) -> dict[str, str]:
        """Where each loaded model runs: "cpu" or "cuda:N"."""
        return {ref: str(m.device) for ref, m in self._models.items()}

    def peek(self, name: str, version: str) -> ServedModel | None:
        """The served model for an exact version if this replica has it loaded."""
        return self._models.get(f"{name}@{version}")

    def resolve(self, ref: str) -> tuple[str, str]:
        """(name, version); raises UnknownNameError listing the valid names."""
        return self.store.resolve(ref)

    async def get(self, ref: str | None = None) -> ServedModel:
        """The served model for a reference (default: the settings' default model)."""
        name, version = self.resolve(ref or self.settings.default_model)
        key = f"{name}@{version}"
        served = self._models.get(key)
        if served is not None:
            self._models.move_to_end(key)
            return served
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < self.settings.model_retry_s:
            # A version that just failed to load (damaged artifact) is not re-hashed and
            # re-logged on every request; it is tried again after model_retry_s.
            raise failed[1]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            served = self._models.get(key)
            if served is None:
                try:
                    served = await self._load(key)
                except Exception as e:
                    self._failed[key] = (time.monotonic(), e)
                    raise
                self._failed.pop(key, None)
        return served

    async def _load(self, key: str) -> ServedModel:
        t0 = time.perf_counter()
        loaded = await asyncio.to_thread(self.store.load, key)
        served = await asyncio.to_thread(
            ServedModel, loaded, self.settings, self.metrics, self.pool, self.cores, self.trials
        )
        try:
            warm = await served.warm_up(self.settings.max_batch)
        except BaseException:
            await served.close(0.0)  # its thread ends and its cores go back
            raise
        self._models[key] = served
        log.info(
            "loaded %s on %s in %.2f s (warm-up %.2f s)",
            key,
            served.device,
            time.perf_counter() - t0,
            warm,
        )
        while len(self._models) > self.settings.max_loaded_models:
            old_key, old = self._models.popitem(last=False)
            log.info(
                "unloading %s (max_loaded_models=%d)", old_key, self.settings.max_loaded_models
            )
            closing = asyncio.get_running_loop().create_task(
                old.close(self.settings.graceful_shutdown_s)
            )
            closing.add_done_callback(lambda _: settle_heap())
        settle_heap()
        return served

    async def load_startup_models(self, retry_s: float = 5.0) -> None:
        """Load and warm the configured models, each on its own.

        ``ready`` once every start-up model has been tried and at least one serves: a
        corrupted or missing model must not take a replica that serves the others out of
        rotation. Models that failed are listed in ``failures`` (shown by /readyz, naming
        the file for a damaged artifact) and retried every ``retry_s`` seconds, so one
        published or repaired later is picked up without a restart.
        """
        pending = list(dict.fromkeys(self.settings.startup_models()))
        while pending:
            still: list[str] = []
            for ref in pending:
                try:
                    await self.get(ref)
                    self.failures.pop(ref, None)
                except Exception as e:
                    self.failures[ref] = f"{type(e).__name__}: {e}"
                    log.error(
                        "start-up model %s failed to load (retrying): %s", ref, self.failures[ref]
                    )
                    still.append(ref)
            self.ready = bool(self._models)
            self.error = "; ".join(f"{r}: {m}" for r, m in self.failures.items()) or None
            pending = still
            if pending:
                await asyncio.sleep(retry_s)

    async def close(self) -> None:
        for served in list(self._models.values()):
            await served.close(self.settings.graceful_shutdown_s)
        self._models.clear()
        gc.unfreeze()  # the process may go on (tests, benchmarks): collect normally again
