"""Builds the FastAPI app: settings, lifespan (models, cache, pools), middleware, routers.

uvicorn --factory service.main:create_app     or     python -m service
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from threadpoolctl import threadpool_info, threadpool_limits

from model_store import ModelStore
from protokit.threads import use_torch_threads
from service.cache import ExplanationCache
from service.errors import ErrorResponse, install_error_handlers
from service.explanations import ExplanationService
from service.images import configure_pillow
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, configure_logging
from service.registry import ModelRegistry, Runtime
from service.revisions import Revisions
from service.routes import explain, explanations, health, kserve, models
from service.settings import Settings

log = logging.getLogger("service")

ERROR_RESPONSES: dict[int | str, dict] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in (
        (400, "empty, truncated or corrupt image"),
        (401, "missing or invalid API key"),
        (404, "unknown model, version, alias, explanation or prototype"),
        (413, "too many bytes or too many pixels"),
        (415, "not an image, or an unsupported format or content type"),
        (422, "a bad option"),
        (503, "queue full (with Retry-After) or not ready"),
    )
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings`` (default: from PROTOPNET_* environment variables)."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    configure_pillow(settings.max_image_pixels)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Workers run torch single-threaded; only model threads use several (protokit.threads).
        pool = ThreadPoolExecutor(
            settings.pool_threads,
            thread_name_prefix="work",
            initializer=use_torch_threads,
            initargs=(1,),
        )
        # asyncio.to_thread (store reads, model loading) runs on the same workers.
        asyncio.get_running_loop().set_default_executor(pool)
        # The event loop's thread too runs torch single-threaded while the app lives.
        loop_threads = torch.get_num_threads()
        use_torch_threads(1)
        # numpy's BLAS (OpenBLAS) single-threaded too, for the whole process: the maps'
        # bicubic matrix products run on the workers side by side, and with OpenBLAS's
        # own threads on top they went from 6.4 ms to 22-44 ms median (once 555 ms)
        # under load on 2 cores.
        blas = threadpool_limits(limits=1, user_api="blas")
        cache = ExplanationCache(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.local_cache_entries,
            settings.local_cache_bytes,
            metrics,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
        )
        await cache.start()
        runtime = Runtime.from_settings(settings)  # device, layout, threads: once
        registry = ModelRegistry(ModelStore(settings.store), settings, metrics, runtime)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.cache = cache
        app.state.registry = registry
        app.state.explanations = ExplanationService(settings, cache, pool, metrics)
        app.state.revisions = revisions = Revisions(settings.store)
        loading = asyncio.create_task(registry.load_startup_models(settings.model_retry_s))
        log.info(
            "service starting",
            extra={
                "store": str(settings.store),
                "models": settings.startup_models(),
                "device": str(runtime.device),
                "torch_threads": runtime.torch_threads,
                "worker_threads": settings.pool_threads,
                "blas_threads": max(
                    (i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
                    default=None,
                ),
            },
        )
        try:
            yield
        finally:
            # uvicorn has already finished in-flight requests (graceful shutdown).
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await revisions.close()
            await registry.close()
            await cache.close()
            pool.shutdown(wait=True)
            # threadpoolctl restores OpenMP's count too, as it was when BLAS was limited:
            # so first, and torch's own count after it.
            blas.restore_original_limits()
            torch.set_num_threads(loop_threads)
            log.info("service stopped")

    app = FastAPI(
        title="ProtoPNet explanation service",
        version="1.0.0",
        summary="POST an image, get 'this looks like that': prototypes, scoring sheets, boxes.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url="/docs" if settings.serves_docs else None,
        redoc_url="/redoc" if settings.serves_docs else None,
        openapi_url="/openapi.json" if settings.serves_docs else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    for module in (explain, explanations, models, kserve, health):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "X-Cache",
                "Retry-After",
                "X-Heatmap-Width",
                "X-Heatmap-Height",
            ],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
