"""What the service benchmarks and the reliability tests share: models in a store, request
images that never hit the cache, a closed-loop HTTP load generator, and the server's
resident memory.

The server itself is started with the service tests' helpers (``tests.service.conftest``:
``launch_server``, ``RedisProcess``), so benchmarks and tests run the same real process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from model_store import ModelStore, PrototypeRecord
from protokit.threads import on_scratch_thread
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.errors import ProtoPNetError
from protopnet.model import create_model

if TYPE_CHECKING:
    from service.explanations import ExplanationService
    from service.registry import ModelRegistry, ServedModel
    from service.settings import Settings
    from tests.support.servers import ServerProcess

DEMO_NAME = (
    "fashion-mnist"  # the demo model's name in the store (training/configs/fashion_mnist.yaml)
)
DEMO_ALIAS = "production"
RANDOM_DEMO = "demo-random"  # a random-weight stand-in with the demo's architecture
VGG19_NAME = "vgg19-cub-random"


# -- models ---------------------------------------------------------------------------


def cub_vgg19_config(num_classes: int = 200) -> ProtoPNetConfig:
    """CUB scale as the reference implementation measured it (its settings.py): VGG-19
    trunk, 200 classes x 10 prototypes, D = 128, regular add-on layers, 224 px."""
    return ProtoPNetConfig(
        backbone="vgg19",
        num_classes=num_classes,
        prototypes_per_class=10,
        prototype_depth=128,
        add_on="regular",
        img_size=224,
    )


def demo_architecture() -> tuple[ProtoPNetConfig, Preprocessing, list[str]]:
    """The demo's architecture and preprocessing, from the config that trains it."""
    from training.config import load_config
    from training.data import FASHION_MNIST_CLASSES

    cfg = load_config("fashion_mnist")
    classes = list(FASHION_MNIST_CLASSES)
    return cfg.model.architecture(len(classes)), cfg.model.preprocessing(), classes


def publish_random(
    store: ModelStore,
    name: str,
    arch: ProtoPNetConfig,
    prep: Preprocessing,
    class_names: list[str],
    seed: int = 0,
) -> str:
    """Publish a random-weight model (speed does not depend on the weights); its ref.

    Built on a scratch thread: torch's ops here would leave this thread (often the one
    that then runs the service in process) an OpenMP team that throttles the model's."""
    return on_scratch_thread(lambda: _publish_random(store, name, arch, prep, class_names, seed))


def _publish_random(
    store: ModelStore,
    name: str,
    arch: ProtoPNetConfig,
    prep: Preprocessing,
    class_names: list[str],
    seed: int,
) -> str:
    torch.manual_seed(seed)
    model = create_model(arch).eval()
    classes = arch.classes_of_prototypes()
    records = [PrototypeRecord(index=j, class_index=k) for j, k in enumerate(classes)]
    m = store.publish(
        name,
        model,
        prep,
        class_names,
        records,
        training_config={"note": "random weights, published by bench.serving for timing"},
    )
    return f"{m.name}@{m.version}"


@dataclass
class ModelSource:
    """Where a benchmark's model lives: a store folder and a reference into it."""

    store: Path
    ref: str
    trained: bool  # False: random weights with the architecture of the real thing

    @property
    def name(self) -> str:
        return self.ref.partition("@")[0]

    def resolved(self) -> str:
        """``name@version``: how the service labels the model in /metrics and logs."""
        name, version = ModelStore(self.store).resolve(self.ref)
        return f"{name}@{version}"


def serve(
    tmp: Path, source: ModelSource, wait_ready: bool = True, **settings: Any
) -> ServerProcess:
    """``python -m service`` serving ``source`` (its default and only start-up model) with
    PROTOPNET_* ``settings``; waits for /readyz unless ``wait_ready`` is False.

    Worker and torch threads are the service's own defaults (the tests' server fixes
    both at 2): until 025bdb1 the benchmarks' servers ran with the tests' 2 workers, so
    on the 16-core GPU machine every image's maps and boxes were made 2 at a time."""
    from tests.support.servers import start_server

    opts: dict[str, Any] = {
        "default_model": source.ref,
        "models": source.ref,
        "log_level": "info",
        "worker_threads": None,
        "torch_threads": None,
    }
    opts.update(settings)
    return start_server(tmp, source.store, wait_ready=wait_ready, **opts)


@dataclass
class InProcess:
    """The service's own objects, running in this process (``in_process``)."""

    settings: Settings
    registry: ModelRegistry
    explanations: ExplanationService
    served: ServedModel


@contextlib.asynccontextmanager
async def in_process(source: ModelSource) -> AsyncIterator[InProcess]:
    """The app of ``service.main.create_app`` with its lifespan running, serving
    ``source`` without Redis and with a batch window of 0 (``max_batch=1``), so its
    objects do a request's work exactly as it would, only without HTTP."""
    from service.main import create_app
    from service.settings import Settings

    settings = Settings(
        store=source.store,
        default_model=source.ref,
        models=[],
        redis_url=None,
        max_batch=1,
        max_wait_ms=0,
        log_level="warning",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        served = await app.state.registry.get(source.ref)
        yield InProcess(settings, app.state.registry, app.state.explanations, served)


def demo_model(
    scratch: Path, store_root: Path | None = None, prefer_trained: bool = True
) -> ModelSource:
    """The trained demo model (``fashion-mnist@production``) when ``prefer_trained`` and the store
    (default: $PROTOPNET_STORE or ./store) has it, else a random-weight model of the same
    architecture published into ``scratch`` (tests always use the stand-in, so they do
    not depend on what a developer has trained)."""
    if prefer_trained:
        real = ModelStore(store_root)
        ref = f"{DEMO_NAME}@{DEMO_ALIAS}"
        try:
            real.resolve(ref)
            return ModelSource(real.root, ref, trained=True)
        except ProtoPNetError:  # no such model or alias: build the stand-in
            pass
    arch, prep, classes = demo_architecture()
    store = ModelStore(scratch)
    if RANDOM_DEMO in store.names():
        return ModelSource(store.root, f"{RANDOM_DEMO}@latest", trained=False)
    return ModelSource(store.root, publish_random(store, RANDOM_DEMO, arch, prep, classes), False)


def vgg19_model(scratch: Path) -> ModelSource:
    """A CUB-scale ProtoPNet (``cub_vgg19_config``) with random weights."""
    store = ModelStore(scratch)
    if VGG19_NAME in store.names():
        return ModelSource(store.root, f"{VGG19_NAME}@latest", trained=False)
    arch = cub_vgg19_config()
    prep = Preprocessing(img_size=224)
    classes = [f"class_{k:03d}" for k in range(200)]
    return ModelSource(store.root, publish_random(store, VGG19_NAME, arch, prep, classes), False)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """``--store`` and ``--no-vgg``: the options of the benchmarks that time the demo
    model and a CUB-scale VGG-19 (``model_cases``)."""
    ap.add_argument("--store", type=Path, help="store with the trained demo (default ./store)")
    ap.add_argument("--no-vgg", action="store_true", help="only the demo model")


def model_cases(
    scratch: Path, args: argparse.Namespace
) -> list[tuple[str, Callable[[], ModelSource]]]:
    """(result key, how to get the model) for the demo and, unless ``--no-vgg``, VGG-19 at
    224 px; random-weight models are published into ``scratch``."""
    cases: list[tuple[str, Callable[[], ModelSource]]] = [
        ("demo", lambda: demo_model(scratch / "store", args.store))
    ]
    if not args.no_vgg:
        cases.append(("vgg19_224", lambda: vgg19_model(scratch / "store")))
    return cases


# -- request images -------------------------------------------------------------------


def _base_pictures(size: int, grayscale: bool) -> list[np.ndarray]:
    """Real pictures to send: Fashion-MNIST test images for greyscale models when the
    Debian package is there, scikit-image's photographs otherwise."""
    from tests.service.store_builder import FASHION_DIR, fashion_available, read_idx

    if grayscale and fashion_available():
        return list(read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:1000])
    import cv2
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    out = [cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in photos]
    return [cv2.cvtColor(p, cv2.COLOR_RGB2GRAY) for p in out] if grayscale else out


class RequestImages:
    """Image file bytes for request ``i``: a real picture with ``i`` written into its
    first pixels (and, for JPEG, whose quantisation may erase that, into a comment), so no
    two requests share bytes and none is answered from the cache. Greyscale pictures are
    sent as PNG, photographs as JPEG (what clients send)."""

    def __init__(self, prep: Preprocessing):
        self.grayscale = prep.grayscale
        self.pictures = _base_pictures(prep.img_size, prep.grayscale)

    def __call__(self, i: int) -> bytes:
        pic = self.pictures[i % len(self.pictures)].copy()
        stamp = np.frombuffer(int(i).to_bytes(8, "little"), dtype=np.uint8)
        pic.reshape(-1)[: stamp.size] = stamp  # (H, W) or (H, W, 3): the first bytes
        buf = io.BytesIO()
        if self.grayscale:
            Image.fromarray(pic).save(buf, "PNG")
        else:
            Image.fromarray(pic).save(buf, "JPEG", quality=90, comment=f"request {i}")
        return buf.getvalue()

    @property
    def content_type(self) -> str:
        return "image/png" if self.grayscale else "image/jpeg"


# -- load -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it."""

    start: float  # time.monotonic() when sent
    end: float
    status: int | None  # None: no HTTP answer (connection refused or dropped)
    error: str | None = None  # the transport error's type and text
    request_id: str = ""  # sent as X-Request-ID; the server's access log carries it

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class LoadRun:
    """Every request of a load run, and summaries a user compares."""

    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def statuses(self) -> dict[str, int]:
        c = Counter("no answer" if s.status is None else str(s.status) for s in self.samples)
        return dict(sorted(c.items()))

    def errors_5xx(self) -> int:
        return sum(1 for s in self.samples if s.status is not None and s.status >= 500)

    def failures(self) -> list[Sample]:
        """Anything but a 200 (an HTTP error or no answer at all)."""
        return [s for s in self.samples if s.status != 200]

    def throughput(self) -> float:
        """Successful requests per second over the run."""
        return len(self.ok()) / max(self.ended - self.started, 1e-9)

    def percentile_ms(self, q: float, since: float = 0.0) -> float | None:
        ms = [s.ms for s in self.ok() if s.start >= since]
        return round(float(np.percentile(ms, q)), 2) if ms else None


async def closed_loop(
    url: str,
    images: RequestImages,
    clients: int,
    duration_s: float,
    path: str = "/explain",
    params: dict[str, Any] | None = None,
    first_index: int = 0,
    stop_on_refused: bool = False,
    timeout_s: float = 120.0,
) -> LoadRun:
    """``clients`` concurrent clients, each sending its next request as soon as the last
    one is answered, for ``duration_s`` seconds. Every request carries a new image.

    ``stop_on_refused``: a client stops once the server refuses connections (shutdown);
    otherwise a refused request is recorded and the client goes on.
    """
    import httpx

    run = LoadRun()
    counter = itertools.count(first_index)
    headers = {"Content-Type": images.content_type}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        run.started = time.monotonic()
        deadline = run.started + duration_s

        async def client() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                body, rid = images(i), f"load-{i}"
                t0 = time.monotonic()
                try:
                    r = await http.post(
                        path, content=body, headers={**headers, "X-Request-ID": rid}, params=params
                    )
                    await r.aread()
                    run.samples.append(Sample(t0, time.monotonic(), r.status_code, None, rid))
                except httpx.TransportError as e:
                    run.samples.append(
                        Sample(t0, time.monotonic(), None, f"{type(e).__name__}: {e}", rid)
                    )
                    if stop_on_refused and isinstance(e, httpx.ConnectError):
                        return
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(client() for _ in range(clients)))
        run.ended = time.monotonic()
    return run


def run_load(*args: Any, **kwargs: Any) -> LoadRun:
    """``closed_loop`` from synchronous code (its own event loop)."""
    return asyncio.run(closed_loop(*args, **kwargs))


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (10^6 bytes; VmRSS from /proc, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


class RssSampler:
    """Samples a process's resident memory (MB) every ``every_s`` seconds on a thread."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_mb(self.pid)))
            except (OSError, RuntimeError):
                return  # the process is gone
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, t: float) -> float:
        """The last sample taken at or before time ``t`` (the first one if none)."""
        if not self.samples:
            raise RuntimeError(f"no memory sample of process {self.pid}")
        before = [mb for ts, mb in self.samples if ts <= t]
        return before[-1] if before else self.samples[0][1]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """A Prometheus sample summed over matching series (the service tests' parser)."""
    from tests.support.servers import metric_value

    return metric_value(text, name, **labels)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; raise naming ``what`` if it never holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout_s} s")
