"""Models served by this replica: loaded from the store, warmed up, one batcher each.

References resolve through the store on every request (so a promoted alias takes effect
at once), off the event loop; a resolved version is loaded on first use and kept, least
recently used first out, up to ``max_loaded_models``.

How a request goes through a model:

1. ``ServedModel.forward``: its ``ModelInput`` joins the model's batcher;
2. the model thread runs ``ServedModel.run_batch``: the forward for the whole batch, and
   on a GPU the explanations too, as batched torch ops on the device;
3. back on the caller's side (the worker pool), ``ServedModel.explanation`` gives the
   image's explanation: the one the GPU made, or on the CPU the numpy path's, per image.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import numpy as np
import torch

from model_store import LoadedModel, ModelStore, WrongKindError
from model_store.manifest import AnyManifest, Manifest, ManifestBase
from protokit.devices import pick_device
from protokit.threads import use_torch_threads
from protopnet.config import Preprocessing
from protopnet.explain import ImageExplanation, PrototypeExplainer
from protopnet.familiarity import Familiarity, FamiliarityScorer
from protopnet.model import ProtoPNet
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.settings import Settings, usable_cores

if TYPE_CHECKING:
    from service.drumond import ServedDrumond

log = logging.getLogger("service.registry")


@dataclass(frozen=True)
class Runtime:
    """Where and how every model of this process runs, decided once at start-up."""

    device: torch.device
    memory_format: torch.memory_format
    torch_threads: int  # intra-op threads of each model thread

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        """Also sets the process-wide cuDNN flag, once."""
        device = pick_device(settings.device)
        if device.type == "cuda":
            # Convolutions only (the trunk, the add-on layers): matrix products, the
            # prototype distances among them, keep PyTorch's true float32 default.
            torch.backends.cudnn.allow_tf32 = settings.allow_tf32
        # The plain rule: the cores shared by the models loaded at start-up. An operator
        # serving several models at once sets PROTOPNET_TORCH_THREADS (a model thread's
        # OpenMP team stays as long as it lives; teams beyond the cores throttle each
        # other, see protokit/threads.py).
        threads = settings.torch_threads or max(
            1, usable_cores() // max(1, len(settings.startup_models()))
        )
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        return cls(device=device, memory_format=memory_format, torch_threads=threads)


@dataclass(frozen=True)
class ModelInput:
    """One image's share of a batch: its preprocessed tensor and, for an explanation,
    the options the explainer needs (None: a prediction only)."""

    x: torch.Tensor  # (3, S, S)
    image_size: tuple[int, int] | None = None  # (width, height), oriented original
    top_classes: int = 3
    top_prototypes: int = 10


@dataclass(frozen=True)
class ForwardResult:
    """One image's share of a batched forward pass, on the CPU: its logits, and either
    the explanation made on the device or what the CPU path makes it from."""

    logits: torch.Tensor  # (K,)
    explanation: ImageExplanation | None = None  # made on the GPU
    min_distances: torch.Tensor | None = None  # (P,)
    sim_maps: torch.Tensor | None = None  # (P, H', W') similarity maps before pooling
    familiarity: float | None = None  # the image's familiarity score (None: uncalibrated)


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


@torch.inference_mode()
def forward_batch(
    model: ProtoPNet,
    explainer: PrototypeExplainer,
    scorer: FamiliarityScorer | None,
    rt: Runtime,
    inputs: list[ModelInput],
) -> list[ForwardResult]:
    """B inputs -> B results: the forward, the familiarity scores, and on a GPU the
    explanations. Runs on the model thread only."""
    x = torch.stack([i.x for i in inputs])
    x = x.to(rt.device, memory_format=rt.memory_format, non_blocking=True)
    out = model.forward_full(x)
    B = len(inputs)
    fam: list[float | None] = (
        [None] * B if scorer is None else scorer.scores(out.features).float().cpu().tolist()
    )
    wanted = [b for b, i in enumerate(inputs) if i.image_size is not None]
    if rt.device.type == "cpu" or not wanted:
        # On the CPU the maps leave the model thread; the pool explains each image.
        logits = out.logits.float().cpu()
        if not wanted:
            return [ForwardResult(logits[b], familiarity=fam[b]) for b in range(B)]
        sims = model.similarity(out.distances).float().cpu()  # (B, P, H', W')
        min_d = out.min_distances.float().cpu()
        return [ForwardResult(logits[b], None, min_d[b], sims[b], fam[b]) for b in range(B)]
    logits = out.logits.float().to("cpu", non_blocking=True)  # synchronised below
    rows = torch.tensor(wanted, device=rt.device)
    exps = explainer.explain_maps(
        model.similarity(out.distances[rows]),
        out.logits[rows],
        out.min_distances[rows],
        [inputs[b].image_size for b in wanted],  # type: ignore[misc]
        [inputs[b].top_classes for b in wanted],
        [inputs[b].top_prototypes for b in wanted],
    )
    by_row = dict(zip(wanted, exps, strict=True))
    return [ForwardResult(logits[b], by_row.get(b), familiarity=fam[b]) for b in range(B)]


R = TypeVar("R")


class Served(Generic[R]):
    """What every served model kind has: its version, its batcher on its own model
    thread, the runtime. ``ServedModel`` (ProtoPNet) and ``service.drumond.ServedDrumond``
    are frozen dataclasses with these fields."""

    manifest: ManifestBase
    manifest_sha256: str
    batcher: MicroBatcher[ModelInput, R]
    runtime: Runtime
    metrics: Metrics
    explains: ClassVar[bool]  # whether the warm-up batches ask for explanations

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    async def forward(self, request: ModelInput) -> R:
        """One image through the batcher."""
        self.metrics.queue_depth.labels(self.ref).set(self.batcher.depth + 1)
        return await self.batcher.submit(request)

    async def warm_up(self, max_batch: int) -> float:
        """Run batches of 1, 2 and the max size once (with explanations where the kind
        makes them), so the first request is not slow, then start taking requests."""
        t0 = time.perf_counter()
        S = self.preprocessing.img_size
        size = (S, S) if self.explains else None
        for b in sorted({1, min(2, max_batch), max_batch}):
            inputs = [ModelInput(torch.zeros(3, S, S), size) for _ in range(b)]
            await self.batcher.on_thread(functools.partial(self.batcher.run_batch, inputs))
        self.batcher.start()
        return time.perf_counter() - t0

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)


def model_batcher(
    ref: str,
    run_batch: Callable[[list[ModelInput]], list[R]],
    runtime: Runtime,
    settings: Settings,
    metrics: Metrics,
) -> MicroBatcher[ModelInput, R]:
    """A model's micro-batcher with the settings' limits, reporting to ``metrics``."""

    def on_batch(n: int, dt: float) -> None:
        metrics.batch_size.labels(ref).observe(n)
        metrics.forward.labels(ref).observe(dt)
        metrics.queue_depth.labels(ref).set(batcher.depth)

    batcher: MicroBatcher[ModelInput, R] = MicroBatcher(
        ref,
        run_batch,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=on_batch,
        on_wait=lambda s: metrics.queue_wait.labels(ref).observe(s),
        thread_init=lambda: use_torch_threads(runtime.torch_threads),
    )
    return batcher


@dataclass(frozen=True)
class ServedModel(Served[ForwardResult]):
    """A loaded ProtoPNet version, ready to serve: its model on the runtime's device,
    explainer, batcher and metadata. Built once by ``load_served``; nothing in it changes
    after."""

    manifest: Manifest
    manifest_sha256: str
    model: ProtoPNet
    explainer: PrototypeExplainer
    batcher: MicroBatcher[ModelInput, ForwardResult]
    runtime: Runtime
    metrics: Metrics
    familiarity: Familiarity | None  # None: the version was published uncalibrated
    familiarity_threshold: float | None  # scores below it are unfamiliar
    explains: ClassVar[bool] = True

    @functools.cached_property
    def prototype_classes(self) -> list[int]:
        """Each prototype's class (read once: every explanation's JSON names them)."""
        return [p.class_index for p in self.manifest.prototypes]

    @property
    def prototypes_of_class(self) -> list[np.ndarray]:
        """Per class, the indices of its own prototypes (the scoring sheets' rows)."""
        return self.explainer.prototypes_of_class

    def explanation(self, fwd: ForwardResult, request: ModelInput) -> ImageExplanation:
        """The image's explanation: made on the device, or here from the maps (numpy)."""
        if fwd.explanation is not None:
            return fwd.explanation
        assert fwd.sim_maps is not None and fwd.min_distances is not None
        assert request.image_size is not None
        return self.explainer.explain_maps(
            fwd.sim_maps[None],
            fwd.logits[None],
            fwd.min_distances[None],
            [request.image_size],
            request.top_classes,
            request.top_prototypes,
        )[0]


def load_served(
    loaded: LoadedModel, runtime: Runtime, settings: Settings, metrics: Metrics
) -> ServedModel:
    """The model moved to the runtime's device and layout, with its explainer and batcher."""
    model = loaded.model.to(runtime.device).eval()
    model.to(memory_format=runtime.memory_format)
    explainer = PrototypeExplainer(
        model, loaded.manifest.preprocessing, settings.max_map_side, frozen=True
    )
    ref = loaded.ref
    familiarity = loaded.familiarity()
    scorer = None if familiarity is None else familiarity.scorer(runtime.device)

    batcher = model_batcher(
        ref,
        functools.partial(forward_batch, model, explainer, scorer, runtime),
        runtime,
        settings,
        metrics,
    )
    return ServedModel(
        manifest=loaded.manifest,
        manifest_sha256=loaded.manifest_sha256,
        model=model,
        explainer=explainer,
        batcher=batcher,
        runtime=runtime,
        metrics=metrics,
        familiarity=familiarity,
        familiarity_threshold=None
        if familiarity is None
        else familiarity.threshold(settings.familiarity_percentile),
    )


class ModelRegistry:
    """Resolves references through the store and keeps loaded versions."""

    def __init__(self, store: ModelStore, settings: Settings, metrics: Metrics, runtime: Runtime):
        self.store, self.settings, self.metrics, self.runtime = store, settings, metrics, runtime
        self._models: OrderedDict[str, ServedModel | ServedDrumond] = OrderedDict()
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

    def peek(self, name: str, version: str) -> ServedModel | ServedDrumond | None:
        """The served model for an exact version if this replica has it loaded."""
        return self._models.get(f"{name}@{version}")

    async def resolve(self, ref: str | None = None) -> tuple[str, str]:
        """(name, version) of a reference (default: the settings' default model), read
        from the store off the event loop; raises UnknownNameError listing the valid names."""
        return await asyncio.to_thread(self.store.resolve, ref or self.settings.default_model)

    async def any_manifest(self, ref: str) -> tuple[AnyManifest, str | None]:
        """A version's manifest (any kind), and its SHA-256 when this replica has it
        loaded: from the loaded model, else read from the store (checked against
        manifest.sha256)."""
        name, version = await self.resolve(ref)
        served = self.peek(name, version)
        if served is not None:
            return served.manifest, served.manifest_sha256
        return await asyncio.to_thread(self.store.any_manifest, f"{name}@{version}"), None

    async def manifest(self, ref: str) -> tuple[Manifest, str | None]:
        """``any_manifest`` for routes that need a ProtoPNet (WrongKindError otherwise)."""
        m, sha = await self.any_manifest(ref)
        if not isinstance(m, Manifest):
            raise WrongKindError(f"{m.name}@{m.version}", m.kind, "protopnet")
        return m, sha

    async def get(self, ref: str | None = None) -> ServedModel:
        """The served ProtoPNet for a reference (default: the settings' default model);
        WrongKindError for another kind."""
        served = await self.get_any(ref)
        if not isinstance(served, ServedModel):
            raise WrongKindError(served.ref, served.manifest.kind, "protopnet")
        return served

    async def get_any(self, ref: str | None = None) -> ServedModel | ServedDrumond:
        """The served model of any kind for a reference (default: the settings' default)."""
        name, version = await self.resolve(ref)
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

    async def _load(self, key: str) -> ServedModel | ServedDrumond:
        t0 = time.perf_counter()
        manifest = await asyncio.to_thread(self.store.any_manifest, key)
        served: ServedModel | ServedDrumond
        if manifest.kind == "drumond":
            from service.drumond import load_served_drumond  # it imports this module

            drumond = await asyncio.to_thread(self.store.load_drumond, key)
            served = await asyncio.to_thread(
                load_served_drumond, drumond, self.runtime, self.settings, self.metrics
            )
        else:
            loaded = await asyncio.to_thread(self.store.load, key)
            served = await asyncio.to_thread(
                load_served, loaded, self.runtime, self.settings, self.metrics
            )
        try:
            warm = await served.warm_up(self.settings.max_batch)
        except BaseException:
            await served.close(0.0)
            raise
        self._models[key] = served
        log.info(
            "loaded %s on %s with %d torch threads in %.2f s (warm-up %.2f s)",
            key, served.device, self.runtime.torch_threads, time.perf_counter() - t0, warm,
        )  # fmt: skip
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
