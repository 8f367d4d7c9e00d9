"""Liveness and readiness (never an API key: probes), Prometheus metrics (the API key
when keys are set)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ApiKey, CacheDep, RegistryDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Alive: the process answers HTTP."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models not loaded yet, or failing"}},
)
async def readyz(registry: RegistryDep, cache: CacheDep) -> JSONResponse:
    """200 once the start-up models are tried and at least one is loaded and warmed up.

    ``status`` is "degraded" (still 200) while Redis is unreachable, or while a start-up
    model failed to load (a damaged artifact is named in ``detail``): the replica keeps
    serving what it can, so taking it out of rotation would not help.
    """
    status: Literal["ready", "degraded", "starting", "failed"]
    problems = []
    if registry.error:
        problems.append(f"models failed to load: {registry.error}")
    if registry.ready:
        if cache.state == "degraded":
            problems.append(f"redis unreachable: {cache.last_error}")
        status = "degraded" if problems else "ready"
        detail = "; ".join(problems) or None
        code = 200
    else:
        status = "failed" if registry.error else "starting"
        detail = "; ".join(problems) or "loading and warming up models"
        code = 503
    body = Readiness(
        status=status,
        models=registry.loaded_refs,
        devices=registry.devices,
        cache=cache.state,
        detail=detail,
    )
    return JSONResponse(body.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response, dependencies=[ApiKey])
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
