"""KServe v1-style aliases: POST /v1/models/{name}:predict and :explain.

Body: {"instances": [<base64 string> | {"b64": ...} | {"image": {"b64": ...}}, ...],
"parameters": {"top_classes": 3, ...}}. A raw image/* or multipart body also works.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from service.deps import (
    ApiKey,
    ExplainOptions,
    ExplanationsDep,
    ModelPath,
    PredictOptions,
    RegistryDep,
    SettingsDep,
    resolve_options,
    root_of,
)
from service.errors import BadOptionError, ServiceError, TooLargeError, validation_message
from service.schemas import (
    KServeExplainResponse,
    KServePredictResponse,
    KServeRequest,
)
from service.settings import Settings
from service.uploads import read_body, read_upload

router = APIRouter(prefix="/v1/models", tags=["kserve"], dependencies=[ApiKey])


def _inlined_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` substituted in place.

    ``openapi_extra`` is copied into the OpenAPI document as is, where ``#/$defs/...``
    would point nowhere; the KServe models are small and not recursive, so inline them.
    """
    defs = schema.get("$defs", {})

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(defs[ref.removeprefix("#/$defs/")])
            return {k: sub(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return sub(schema)


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined_schema(KServeRequest.model_json_schema())},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _instances(request: Request, settings: Settings) -> tuple[list[bytes], dict[str, Any]]:
    """The images of a KServe request and its parameters."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)  # options in the query, as on /explain
    if media != "application/json":
        upload = await read_upload(request, settings)
        return [upload.data], {**upload.fields, **query}
    limit = settings.max_upload_bytes
    body = await read_body(request, limit, allowed=limit * 4 // 3 + 64 * 1024)  # base64: 4/3
    try:
        req = KServeRequest.model_validate_json(body)
    except ValidationError as e:
        # e.errors(), not e.json(): the latter cannot encode a non-UTF-8 body it quotes.
        raise BadOptionError(validation_message(e.errors(include_url=False))) from None
    if len(req.instances) > settings.max_instances:
        raise BadOptionError(
            f"{len(req.instances)} instances in one request; the limit is "
            f"{settings.max_instances} (PROTOPNET_MAX_INSTANCES)"
        )
    images = []
    for i, inst in enumerate(req.instances):
        b64: str | None
        if isinstance(inst, str):
            b64 = inst
        else:
            holder = inst.image or inst.image_bytes
            b64 = inst.b64 if inst.b64 is not None else (holder.b64 if holder else None)
        if b64 is None:
            raise BadOptionError(
                f"instances[{i}] holds no image: use a base64 string, {{'b64': ...}} or "
                "{'image': {'b64': ...}}"
            )
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadOptionError(f"instances[{i}] is not valid base64") from None
        if len(data) > limit:
            raise TooLargeError(f"instances[{i}] is {len(data)} bytes; the limit is {limit}")
        images.append(data)
    return images, {**query, **(req.parameters or {})}


async def _gather(coros: list) -> list:
    """Run instances concurrently (they share batches); name the instance that failed."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, ServiceError):
            if len(results) > 1:
                r.message = f"instances[{i}]: {r.message}"
            raise r
        if isinstance(r, BaseException):
            raise r
    return list(results)


@router.post("/{name}:predict", response_model=KServePredictResponse, openapi_extra=_BODY)
async def kserve_predict(
    name: ModelPath,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    svc: ExplanationsDep,
) -> KServePredictResponse:
    """KServe v1 predict: {"predictions": [...]}, one per instance."""
    images, params = await _instances(request, settings)
    opts = resolve_options(settings, PredictOptions, ("parameters", {**params, "model": name}))
    served = await registry.get(opts.model)
    preds = await _gather([svc.predict(served, d, opts.top_classes) for d in images])
    return KServePredictResponse(
        model_name=served.name, model_version=served.version, predictions=preds
    )


@router.post("/{name}:explain", response_model=KServeExplainResponse, openapi_extra=_BODY)
async def kserve_explain(
    name: ModelPath,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    svc: ExplanationsDep,
) -> Response:
    """KServe v1 explain: {"explanations": [...]}, each what POST /explain returns."""
    images, params = await _instances(request, settings)
    opts = resolve_options(settings, ExplainOptions, ("parameters", {**params, "model": name}))
    served = await registry.get(opts.model)
    done = await _gather(
        [
            svc.explain(
                served, d, opts.top_classes, opts.top_prototypes, opts.faithfulness, opts.method
            )
            for d in images
        ]
    )
    root = root_of(request)
    bodies = await asyncio.gather(*(svc.present(data, opts.heatmaps, root) for data, _ in done))
    # Each body is already an ExplainResponse's JSON: embed it as is, not parsed again.
    out = {
        "model_name": served.name,
        "model_version": served.version,
        "explanations": [orjson.Fragment(b) for b in bodies],
    }
    return Response(orjson.dumps(out), media_type="application/json")
