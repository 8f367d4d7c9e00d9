"""The process around the model: which threads run torch with several threads
(protokit/threads.py: a second OpenMP team throttles both, which made small forwards 3x
slower), and the heap kept out of the garbage collector's full passes (a 210 ms pause
stalled every request in flight)."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import service.registry as registry_module
from model_store import ModelStore
from service.main import create_app
from service.settings import Settings
from tests.service.store_builder import build_photo_model


def in_process(store: Path, model: str, **overrides: Any) -> Settings:
    """Settings for an app run in this process: no Redis, no start-up models, and the
    models on the CPU (these tests are the CPU runtime's rules, also on a GPU machine)."""
    base: dict[str, Any] = {"models": [], "redis_url": None, "worker_threads": 2, "device": "cpu"}
    return Settings(
        store=store, default_model=model, **{**base, "log_level": "warning", **overrides}
    )


def test_model_thread_uses_torch_threads_and_workers_one(store_root: Path) -> None:
    before = torch.get_num_threads()  # also sets this thread's own count, before the app's
    settings = in_process(store_root, "photo", torch_threads=3)
    rng = np.random.default_rng(0)
    # Large enough that decoding it on a worker would run parallel torch ops.
    big = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")

    def counts() -> tuple[str, int]:
        return threading.current_thread().name, torch.get_num_threads()

    async def main() -> tuple[tuple[str, int], list[tuple[str, int]], dict]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            served = await app.state.registry.get("photo")
            svc = app.state.explanations
            body, hit = await svc.explain(served, buf.getvalue(), 3, 10)
            loop = counts()
            assert loop[1] == 1, f"the event loop's thread runs torch with {loop[1]} threads"
            model = await served.batcher.on_thread(counts)
            workers = await asyncio.gather(*(svc.run(counts) for _ in range(8)))
            return model, workers, {"hit": hit, "body": body}

    model, workers, out = asyncio.run(main())
    assert not out["hit"] and b'"prediction"' in out["body"]
    assert model[0].startswith("model-photo") and model[1] == 3
    assert {name.split("_")[0] for name, _ in workers} == {"work"}
    assert {n for _, n in workers} == {1}
    assert torch.get_num_threads() == before  # the test's own thread is untouched


def test_unset_torch_threads_share_the_cores_among_the_start_up_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PROTOPNET_TORCH_THREADS each model thread gets the cores divided by the
    models loaded at start-up (the plain rule), and the log line says how many."""
    store = ModelStore(tmp_path / "store")
    build_photo_model(store, name="first", seed=1)
    build_photo_model(store, name="second", seed=2)
    monkeypatch.setattr(registry_module, "usable_cores", lambda: 6)

    async def main(models: list[str]) -> list[int]:
        app = create_app(in_process(store.root, "first", models=models))
        async with app.router.lifespan_context(app):
            reg = app.state.registry
            served = [await reg.get(m) for m in models]
            return [await m.batcher.on_thread(torch.get_num_threads) for m in served]

    assert asyncio.run(main(["first"])) == [6]
    assert asyncio.run(main(["first", "second"])) == [3, 3]


def test_each_image_is_explained_on_the_pool_never_on_the_model_thread(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By design, not by how long the queue looks: the model thread runs forwards only,
    and the work after one (maps, boxes, JSON) runs on the worker pool, for a lone image
    and for a batch alike, so the next batch never waits for it."""
    where: list[str] = []
    explanation = registry_module.ServedModel.explanation

    def recorded(self: Any, *args: Any) -> Any:
        where.append(threading.current_thread().name)
        return explanation(self, *args)

    monkeypatch.setattr(registry_module.ServedModel, "explanation", recorded)
    rng = np.random.default_rng(5)
    uploads = []
    for _ in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
        uploads.append(buf.getvalue())

    async def main() -> None:
        app = create_app(in_process(store_root, "photo", max_batch=8, max_wait_ms=50))
        async with app.router.lifespan_context(app):
            served = await app.state.registry.get("photo")
            svc = app.state.explanations
            await svc.explain(served, uploads[0], 3, 10)  # alone
            await asyncio.gather(*(svc.explain(served, u, 3, 10) for u in uploads[1:]))

    asyncio.run(main())
    assert len(where) == 5
    assert all(name.startswith("work") for name in where), where


def test_loaded_models_are_frozen_and_an_unloaded_one_is_freed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    build_photo_model(store, name="first", seed=1)
    build_photo_model(store, name="second", seed=2)
    settings = in_process(store.root, "first", max_loaded_models=1)

    async def main() -> tuple[int, weakref.ref, list[str]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            registry = app.state.registry
            first = weakref.ref(await registry.get("first"))
            frozen = gc.get_freeze_count()  # start-up and the first model: out of full passes
            await registry.get("second")  # evicts "first" (max_loaded_models=1)
            for _ in range(100):  # its batcher closes in the background, then the heap settles
                await asyncio.sleep(0.05)
                if first() is None:
                    break
            return frozen, first, registry.loaded_refs

    try:
        frozen, first, loaded = asyncio.run(main())
    finally:
        gc.unfreeze()  # the test process's own objects go back to normal collection
    assert frozen > 10_000
    assert loaded == ["second@1"]
    assert first() is None, "the unloaded model is still alive (kept by the frozen heap)"


def test_importing_the_service_shortens_openmp_spinning_unless_set() -> None:
    code = "import os, service, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "10000", out.stderr
    env["GOMP_SPINCOUNT"] = "300000"  # an operator's own choice is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "300000", out.stderr


def test_a_model_that_fails_its_warm_up_is_not_served_and_its_thread_ends(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> list:
        raise RuntimeError("out of memory in warm-up")

    monkeypatch.setattr(registry_module, "forward_batch", broken)
    before = {t.name for t in threading.enumerate()}

    async def main() -> tuple[str, list[str], str]:
        app = create_app(in_process(store_root, "photo", model_retry_s=0.001))
        async with app.router.lifespan_context(app):
            reg = app.state.registry
            try:
                await reg.get("photo")
            except RuntimeError as e:
                first = str(e)
            else:
                raise AssertionError("warm-up did not fail")
            monkeypatch.undo()  # mended: the next request after model_retry_s loads it
            await asyncio.sleep(0.05)
            served = await reg.get("photo")
            return first, reg.loaded_refs, served.ref

    error, loaded, ref = asyncio.run(main())
    assert error == "out of memory in warm-up"
    assert loaded == [ref] == ["photo@1"]
    left = {t.name for t in threading.enumerate()} - before
    assert not any(n.startswith("model-") for n in left), left


def test_the_model_runs_channels_last_and_explains_as_in_its_saved_layout(
    store_root: Path,
) -> None:
    """Channels-last is only a faster path (bench/memory_format.py): the same explanation
    as the saved NCHW layout, to float32 rounding, for a real photograph."""
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")

    async def explain(channels_last: bool) -> tuple[bool, bool, dict]:
        app = create_app(in_process(store_root, "photo", channels_last=channels_last))
        async with app.router.lifespan_context(app):
            served = await app.state.registry.get("photo")
            conv = next(m for m in served.model.modules() if isinstance(m, torch.nn.Conv2d))
            body, _ = await app.state.explanations.explain(served, buf.getvalue(), 3, 10)
            return (
                conv.weight.is_contiguous(memory_format=torch.channels_last),
                conv.weight.is_contiguous(),
                json.loads(body),
            )

    assert Settings().channels_last  # the default
    nhwc, nhwc_rowmajor, fast = asyncio.run(explain(True))
    nchw_cl, nchw, saved = asyncio.run(explain(False))
    assert nhwc and not nhwc_rowmajor and nchw and not nchw_cl
    assert [c["class_index"] for c in fast["top_classes"]] == [
        c["class_index"] for c in saved["top_classes"]
    ]
    for a, b in zip(fast["top_classes"], saved["top_classes"], strict=True):
        assert a["logit"] == pytest.approx(b["logit"], rel=1e-4, abs=1e-4)
    pa, pb = fast["prototypes"], saved["prototypes"]
    assert [p["prototype"] for p in pa] == [p["prototype"] for p in pb]
    for a, b in zip(pa, pb, strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], rel=1e-4, abs=1e-4)
        box_a, box_b = (np.array([p["box"][k] for k in ("x0", "y0", "x1", "y1")]) for p in (a, b))
        assert np.abs(box_a - box_b).max() <= 1, (a["box"], b["box"])


def test_no_route_or_dependency_runs_on_a_thread_pool_per_request(store_root: Path) -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency on anyio's thread pool: a
    thread hand-off there and back on every request (three for /explain made the demo's
    HTTP round trip 6 % slower). The service's CPU work goes to its own worker pool, so
    after requests to every kind of route no anyio worker thread may exist."""
    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buf, format="PNG")

    def anyio_workers() -> set[int | None]:
        return {t.ident for t in threading.enumerate() if t.name.startswith("AnyIO worker")}

    before = anyio_workers()  # left idle by something earlier in this process, if any

    async def main() -> tuple[list[int], set[int | None]]:
        app = create_app(in_process(store_root, "photo"))
        statuses = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.post(
                    "/explain", content=buf.getvalue(), headers={"Content-Type": "image/png"}
                )
                body = r.json()
                eid, j = body["id"], body["prototypes"][0]["prototype"]
                statuses.append(r.status_code)
                for url in (
                    f"/explanations/{eid}?heatmaps=inline",
                    f"/explanations/{eid}/heatmaps/{j}.png",
                    f"/explanations/{eid}/boxes.png",
                    f"/explanations/{eid}/report",
                    "/models",
                    "/models/photo",
                    "/readyz",
                    "/healthz",
                    "/metrics",
                ):
                    statuses.append((await c.get(url)).status_code)
            workers = anyio_workers()
        return statuses, workers

    statuses, workers = asyncio.run(main())
    assert statuses == [200] * len(statuses), statuses
    assert not workers - before, "a route or dependency ran on anyio's thread pool"


def test_the_worker_pool_has_a_thread_per_core_unless_set(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a 16-core GPU machine the old fixed 4 workers finished 4 images at a time while
    # the other cores idled.
    import service.settings as settings_module

    monkeypatch.delenv("PROTOPNET_WORKER_THREADS", raising=False)
    for cores, pool in ((2, 4), (12, 12), (64, 32)):
        monkeypatch.setattr(settings_module, "usable_cores", lambda c=cores: c)
        assert Settings(models=[]).pool_threads == pool
    assert Settings(models=[], worker_threads=3).pool_threads == 3
    monkeypatch.setenv("PROTOPNET_WORKER_THREADS", "5")
    assert Settings(models=[]).pool_threads == 5
    monkeypatch.delenv("PROTOPNET_WORKER_THREADS")

    monkeypatch.setattr(settings_module, "usable_cores", lambda: 12)
    settings = in_process(store_root, "photo", worker_threads=None)
    meet = threading.Barrier(12, timeout=10)  # breaks unless 12 jobs run at once

    def job() -> str:
        meet.wait()
        return threading.current_thread().name

    async def main() -> list[str]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            return await asyncio.gather(*(app.state.explanations.run(job) for _ in range(24)))

    names = asyncio.run(main())
    assert len(set(names)) == 12, f"{len(set(names))} worker threads ran the jobs, not 12"
