"""POST /explain and POST /predict."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.deps import (
    ApiKey,
    ExplainOptions,
    ExplainRequest,
    ExplanationsDep,
    PredictOptions,
    PredictRequest,
    RegistryDep,
    form_fields,
    root_of,
)
from service.schemas import ExplainResponse, PredictResponse

router = APIRouter(tags=["explain"], dependencies=[ApiKey])


def image_body(options: type[PredictOptions]) -> dict[str, Any]:
    """OpenAPI request body: multipart field ``image`` with the options as form fields,
    or a raw image/* body."""
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary"},
        **form_fields(options),
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": ["image"]}
                },
                "image/*": binary,
                "application/dicom": binary,
            },
        }
    }


@router.post("/explain", response_model=ExplainResponse, openapi_extra=image_body(ExplainOptions))
async def explain(
    request: Request, given: ExplainRequest, registry: RegistryDep, svc: ExplanationsDep
) -> Response:
    """This looks like that: prediction, scoring sheets, top prototypes with boxes.

    The same image with the same model version and options is answered from the cache
    (header ``X-Cache: hit``). Options come from the query or from form fields.
    """
    upload, opts = given
    served = await registry.get(opts.model)
    data, hit = await svc.explain(
        served, upload.data, opts.top_classes, opts.top_prototypes, opts.faithfulness, opts.method
    )
    body = await svc.present(data, opts.heatmaps, root_of(request))
    return Response(
        body, media_type="application/json", headers={"X-Cache": "hit" if hit else "miss"}
    )


@router.post("/predict", response_model=PredictResponse, openapi_extra=image_body(PredictOptions))
async def predict(
    given: PredictRequest, registry: RegistryDep, svc: ExplanationsDep
) -> PredictResponse:
    """The fast path: prediction and top classes, no maps, no cache."""
    upload, opts = given
    served = await registry.get(opts.model)
    return await svc.predict(served, upload.data, opts.top_classes)
