"""POST /explain and POST /predict."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.deps import (
    ApiKey,
    ExplanationsDep,
    RegistryDep,
    SettingsDep,
    read_upload,
    resolve_options,
    root_of,
)
from service.schemas import ExplainResponse, HeatmapMode, PredictResponse

router = APIRouter(tags=["explain"], dependencies=[ApiKey])

_OPTION_FIELDS = {
    "model": {"type": "string", "description": "name, name@version or name@alias"},
    "top_classes": {"type": "integer", "minimum": 1},
    "top_prototypes": {"type": "integer", "minimum": 1},
    "heatmaps": {"type": "string", "enum": ["url", "inline", "none"]},
}


def image_body(with_options: bool) -> dict:
    """OpenAPI request body: multipart field ``image`` or a raw image/* body."""
    props: dict = {"image": {"type": "string", "format": "binary"}}
    if with_options:
        props.update(_OPTION_FIELDS)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": ["image"]}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


ModelQ = Annotated[str | None, Query(description="name, name@version or name@alias")]
TopClassesQ = Annotated[int | None, Query(description="classes with a scoring sheet (3)")]
TopProtosQ = Annotated[int | None, Query(description="most activated prototypes shown (10)")]
HeatmapsQ = Annotated[HeatmapMode | None, Query(description="url (default), inline or none")]


@router.post("/explain", response_model=ExplainResponse, openapi_extra=image_body(True))
async def explain(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    svc: ExplanationsDep,
    model: ModelQ = None,
    top_classes: TopClassesQ = None,
    top_prototypes: TopProtosQ = None,
    heatmaps: HeatmapsQ = None,
) -> Response:
    """This looks like that: prediction, scoring sheets, top prototypes with boxes.

    The same image with the same model version and options is answered from the cache
    (header ``X-Cache: hit``). Options come from the query or from form fields.
    """
    upload = await read_upload(request, settings)
    query = {
        "model": model,
        "top_classes": top_classes,
        "top_prototypes": top_prototypes,
        "heatmaps": heatmaps,
    }
    opts = resolve_options(settings, query, upload.fields)
    served = await registry.get(opts.model)
    data, hit = await svc.explain(
        served, upload.data, opts.top_classes, opts.top_prototypes, root_of(request)
    )
    body = await svc.present(data, opts.heatmaps)
    return Response(
        body, media_type="application/json", headers={"X-Cache": "hit" if hit else "miss"}
    )


@router.post("/predict", response_model=PredictResponse, openapi_extra=image_body(True))
async def predict(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    svc: ExplanationsDep,
    model: ModelQ = None,
    top_classes: TopClassesQ = None,
) -> PredictResponse:
    """The fast path: prediction and top classes, no maps, no cache."""
    upload = await read_upload(request, settings)
    opts = resolve_options(settings, {"model": model, "top_classes": top_classes}, upload.fields)
    served = await registry.get(opts.model)
    return await svc.predict(served, upload.data, opts.top_classes)
