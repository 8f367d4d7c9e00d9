"""The process around the model: which threads run torch with several threads
(protopnet/threads.py: a second OpenMP team throttles both, which made small forwards 3x
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
from protopnet.threads import DEFAULT_TORCH_THREADS, CoreBudget
from service.main import create_app
from service.registry import choose_torch_threads
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
            body, hit = await svc.explain(served, buf.getvalue(), 3, 10, "")
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


def test_torch_threads_go_to_a_model_only_where_they_pay() -> None:
    # 2 cores: the second must give at least half a core's worth (1.5x faster).
    assert choose_torch_threads(2.3e-3, 2.2e-3, 2) == 1  # the demo model: no faster
    assert choose_torch_threads(2.34e-3, 1.62e-3, 2) == 1  # the demo model, another start
    assert choose_torch_threads(1.77e-3, 1.31e-3, 2) == 1  # the demo model, channels-last
    assert choose_torch_threads(0.40, 0.22, 2) == 2  # VGG-19: 1.8x faster
    assert choose_torch_threads(0.40, 0.29, 2) == 1  # 1.4x
    assert choose_torch_threads(1.0, 0.3, 4) == 4 and choose_torch_threads(1.0, 0.5, 4) == 1


def test_unset_torch_threads_are_timed_and_used_on_the_model_thread(
    store_root: Path, capsys
) -> None:
    """Without PROTOPNET_TORCH_THREADS a CPU model's thread gets what warm-up chose, and
    the log says why; an explicit setting is used as it is (the test above)."""
    settings = in_process(store_root, "photo", log_level="info")

    async def main() -> tuple[int, int]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            served = await app.state.registry.get("photo")
            n = await served.batcher.on_thread(torch.get_num_threads)
            return served.torch_threads, n

    chosen, used = asyncio.run(main())
    assert chosen == used
    if DEFAULT_TORCH_THREADS > 1:
        log = capsys.readouterr()
        assert chosen in (1, DEFAULT_TORCH_THREADS)
        assert f"with {DEFAULT_TORCH_THREADS}: using {chosen}" in log.out + log.err


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


def test_model_threads_share_the_spare_cores() -> None:
    cores = CoreBudget(4)  # 3 workers beyond the model threads' own cores
    a, b, c = object(), object(), object()
    assert cores.take(a, 4) == 4 and cores.free() == 0
    assert cores.take(b, 4) == 1  # nothing left: one thread, no team
    cores.give_back(a)
    assert cores.take(b, 2) == 2 and cores.free() == 2
    assert cores.take(b, 4) == 4  # b's own 2 count as free when it asks again
    assert cores.take(c, 3, insist=True) == 3 and cores.free() == 0  # the operator's count
    cores.give_back(b)
    cores.give_back(c)
    assert cores.free() == 3 and cores.held == {}


def openmp_workers() -> int:
    """Threads of this process that Python did not start (libgomp's team workers)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


@pytest.mark.skipif(DEFAULT_TORCH_THREADS < 2, reason="needs 2 cores to share")
def test_two_models_never_hold_more_workers_than_cores_and_an_idle_one_gives_them_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both models want every core (as a VGG-19 does). The second one loaded takes them
    for its trial from the first, which is not busy; the first, served meanwhile, runs on
    one thread with no team while the second served recently, and gets them back once
    the second has been idle. At no point do the teams' workers outnumber the spare
    cores (which throttled both)."""
    store = ModelStore(tmp_path / "store")
    build_photo_model(store, name="first", seed=1)
    build_photo_model(store, name="second", seed=2)
    build_photo_model(store, name="small", seed=3)
    monkeypatch.setattr(registry_module, "CORES_IDLE_S", 60.0)
    spare = DEFAULT_TORCH_THREADS - 1
    before = openmp_workers()

    async def state(models: list[Any]) -> dict[str, Any]:
        for _ in range(200):  # an ended thread's team goes away shortly after it
            if openmp_workers() - before <= spare:
                break
            await asyncio.sleep(0.02)
        used = [await m.batcher.on_thread(torch.get_num_threads) for m in models]
        return {
            "threads": [m.torch_threads for m in models],
            "used": used,
            "workers": openmp_workers() - before,
        }

    async def main() -> list[dict[str, Any]]:
        # One that keeps one thread after its trial with all cores leaves no team.
        monkeypatch.setattr(registry_module, "choose_torch_threads", lambda *_: 1)
        app = create_app(in_process(store.root, "small"))
        async with app.router.lifespan_context(app):
            reg = app.state.registry
            while not reg.ready:
                await asyncio.sleep(0.01)
            small = await reg.get("small")
            seen = [await state([small])]
            monkeypatch.setattr(registry_module, "choose_torch_threads", lambda *a: a[2])
            first = await reg.get("first")
            seen.append(await state([first]))
            second = await reg.get("second")
            seen.append(await state([first, second]))
            await first.forward(torch.zeros(3, 64, 64))  # second warmed up just now: keeps them
            seen.append(await state([first, second]))
            monkeypatch.setattr(registry_module, "CORES_IDLE_S", 0.2)
            await asyncio.sleep(0.3)
            await first.forward(torch.zeros(3, 64, 64))  # second idle: first takes them
            seen.append(await state([first, second]))
            return seen

    seen = asyncio.run(main())
    n = DEFAULT_TORCH_THREADS
    assert seen[0]["threads"] == seen[0]["used"] == [1] and seen[0]["workers"] == 0
    assert seen[1]["threads"] == seen[1]["used"] == [n]
    assert seen[2]["threads"] == seen[2]["used"] == [1, n]
    assert seen[3]["threads"] == seen[3]["used"] == [1, n]
    assert seen[4]["threads"] == seen[4]["used"] == [n, 1]
    assert all(s["workers"] <= spare for s in seen), seen


def test_a_model_that_fails_its_warm_up_gives_its_cores_back(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, x: torch.Tensor) -> list:
        raise RuntimeError("out of memory in warm-up")

    monkeypatch.setattr(registry_module.ServedModel, "_run_batch", broken)

    async def main() -> tuple[str, int, dict]:
        app = create_app(in_process(store_root, "photo", torch_threads=2))
        async with app.router.lifespan_context(app):
            reg = app.state.registry
            try:
                await reg.get("photo")
            except RuntimeError as e:
                return str(e), reg.cores.free(), dict(reg.cores.held)
            raise AssertionError("warm-up did not fail")

    error, free, held = asyncio.run(main())
    assert error == "out of memory in warm-up"
    assert held == {} and free == max(0, DEFAULT_TORCH_THREADS - 1)


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
            body, _ = await app.state.explanations.explain(served, buf.getvalue(), 3, 10, "")
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
