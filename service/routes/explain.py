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
from service.drumond import ServedDrumond
from service.errors import BadOptionError
from service.explanations import with_root
from service.schemas import DrumondExplainResponse, ExplainResponse, PredictResponse

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


@router.post(
    "/explain",
    response_model=ExplainResponse | DrumondExplainResponse,
    openapi_extra=image_body(ExplainOptions),
)
async def explain(
    request: Request, given: ExplainRequest, registry: RegistryDep, svc: ExplanationsDep
) -> Response:
    """This looks like that: prediction, scoring sheets, top prototypes with boxes.

    On a Drumond soft-max prototype model (``kind: drumond``) the answer is the classes,
    the prototypes the image matched (q, their class association, their nearest
    training images) and whether they are split between classes; such a model has no
    heatmaps, so ``method`` and ``faithfulness`` do not apply to it.

    The same image with the same model version and options is answered from the cache
    (header ``X-Cache: hit``). Options come from the query or from form fields.
    """
    upload, opts = given
    any_served = await registry.get_any(opts.model)
    if isinstance(any_served, ServedDrumond):
        if opts.faithfulness or opts.method != "upsample":
            raise BadOptionError(
                f"{any_served.ref} is a Drumond soft-max prototype model: its prototypes are "
                "whole training images, so it has no heatmaps; method= and faithfulness= "
                "apply to ProtoPNet models only"
            )
        data, hit = await svc.explain_drumond(
            any_served, upload.data, opts.top_classes, opts.top_prototypes
        )
        return Response(
            with_root(data, root_of(request)),
            media_type="application/json",
            headers={"X-Cache": "hit" if hit else "miss"},
        )
    served = any_served
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
    """The fast path: prediction and top classes, no maps, no cache (any model kind)."""
    upload, opts = given
    served = await registry.get_any(opts.model)
    return await svc.predict(served, upload.data, opts.top_classes)
