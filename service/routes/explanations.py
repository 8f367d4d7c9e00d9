"""GET /explanations/{id}, its heatmap PNGs, boxes.png and the printable report."""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import HTMLResponse

from protopnet.errors import ProtoPNetError
from service import render
from service.deps import (
    ApiKey,
    ExplanationsDep,
    PrototypePath,
    RegistryDep,
    SettingsDep,
    root_of,
)
from service.errors import NotFoundError
from service.explanations import ID_LENGTH, is_drumond, is_explanation_id
from service.render import png_size
from service.report import REPORT_CSP, render_drumond_report, render_report
from service.schemas import (
    DrumondExplainResponse,
    ExplainResponse,
    FaithfulnessReceipt,
    HeatmapMode,
    HeatmapSize,
    HeatmapStyle,
    MapMethod,
)

router = APIRouter(prefix="/explanations", tags=["explanations"], dependencies=[ApiKey])

PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG"}}
IdPath = Annotated[str, Path(description=f"{ID_LENGTH} hex characters from POST /explain")]


def _check_id(eid: str) -> str:
    if not is_explanation_id(eid):
        raise NotFoundError(
            f"explanation {eid!r} not found: ids are {ID_LENGTH} lowercase hex characters"
        )
    return eid


def _png(data: bytes, settings_ttl: int) -> Response:
    # An id's PNGs never change; clients may keep them as long as the cache does.
    return Response(
        data, media_type="image/png", headers={"Cache-Control": f"private, max-age={settings_ttl}"}
    )


@router.get("/{eid}", response_model=ExplainResponse)
async def get_explanation(
    eid: IdPath,
    request: Request,
    svc: ExplanationsDep,
    heatmaps: Annotated[
        HeatmapMode, Query(description="url (default): links; inline: base64 PNGs; none")
    ] = "url",
) -> Response:
    """The JSON that POST /explain returned, from any replica (shared cache)."""
    data = await svc.stored_json(_check_id(eid))
    body = await svc.present(data, heatmaps, root_of(request))
    return Response(body, media_type="application/json")


@router.get("/{eid}/heatmaps/{prototype}.png", response_class=Response, responses=PNG)
async def get_heatmap(
    eid: IdPath,
    prototype: PrototypePath,
    svc: ExplanationsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    style: Annotated[HeatmapStyle, Query(description="overlay, heatmap or mask")] = "overlay",
    size: Annotated[
        HeatmapSize,
        Query(description="display (default, at most PROTOPNET_MAX_MAP_SIDE) or upload"),
    ] = "display",
    method: Annotated[
        MapMethod | None,
        Query(
            description="default: the explanation's own (its method option); upsample: the "
            "paper's upsampled similarity map; smoothgrad: the similarity's input gradient "
            "over noisy copies; prp: the similarity's relevance propagated to the pixels; "
            "another method than the explanation's is made on demand"
        ),
    ] = None,
) -> Response:
    """A prototype's activation map: ``overlay`` (JET over the image, the paper's blend),
    ``heatmap`` (RGBA, alpha = activation) or ``mask`` (white where the map is >= its
    95th percentile, whose bounding box is the JSON's box). ``size=upload`` draws
    ``heatmap`` or ``mask`` at the upload's own size (``image.oriented``), the pixels the
    JSON's boxes are in, to lay over the full-size picture. The headers
    ``X-Heatmap-Width`` and ``X-Heatmap-Height`` give the PNG's size, ``X-Heatmap-Method``
    the method that made the map; for a method other than the explanation's own,
    ``X-Heatmap-Box`` is that map's own 95th-percentile box (x0,y0,x1,y1 in upload
    pixels; the JSON's boxes are the explanation's method's)."""
    _check_id(eid)
    if method is None or method == await svc.map_method(eid):
        png, own = await svc.heatmap(eid, prototype, style, size)
        headers = {"X-Heatmap-Method": own}
    else:
        model = orjson.loads(await svc.stored_json(eid))["model"]
        served = await registry.get(f"{model['name']}@{model['version']}")
        png, box = await svc.method_heatmap(served, eid, prototype, method, style, size)
        headers = {"X-Heatmap-Method": method, "X-Heatmap-Box": ",".join(map(str, box))}
    resp = _png(png, settings.cache_ttl_s)
    resp.headers.update(headers)
    w, h = png_size(png)
    resp.headers["X-Heatmap-Width"], resp.headers["X-Heatmap-Height"] = str(w), str(h)
    return resp


@router.get("/{eid}/boxes.png", response_class=Response, responses=PNG)
async def get_boxes(eid: IdPath, svc: ExplanationsDep, settings: SettingsDep) -> Response:
    """The image at display size with the most activated prototypes' boxes."""
    png = await svc.boxes(_check_id(eid))
    return _png(png, settings.cache_ttl_s)


@router.get("/{eid}/report", response_class=HTMLResponse)
async def get_report(
    eid: IdPath, svc: ExplanationsDep, registry: RegistryDep, settings: SettingsDep
) -> HTMLResponse:
    """A self-contained, printable HTML page: the image, then for the predicted class and
    the runner-up, the paper's rows: image part | where on the image | prototype | its
    training image | similarity | weight | points."""
    data = await svc.stored_json(_check_id(eid))
    if is_drumond(data):
        return await _drumond_report(eid, data, svc, registry)
    resp = ExplainResponse.model_validate_json(data)
    rd, image = await svc.render_data(eid)
    ref = f"{resp.model.name}@{resp.model.version}"
    try:
        m, _ = await registry.manifest(ref)
        read = functools.partial(registry.store.prototype_image_bytes, m)  # in the pool job
        metrics, quality = m.metrics, m.interpretability
    except ProtoPNetError:  # the version left the store: the report renders without them
        read, metrics, quality = None, None, None
    # Every row the page shows gets its receipt: the JSON's (faithfulness=true), else
    # checked now on the kept model input, once, and cached with the explanation.
    rows = {r.prototype for s in resp.scoring_sheets[:2] for r in s.rows[: settings.report_rows]}
    unchecked = sorted(
        p.prototype for p in resp.prototypes if p.receipt is None and p.prototype in rows
    )
    if unchecked and read is not None:
        found = await svc.report_receipts(await registry.get(ref), resp, unchecked)
        for p in resp.prototypes:
            if p.prototype in found:
                p.receipt = FaithfulnessReceipt(**dataclasses.asdict(found[p.prototype]))
    html = await svc.run(
        render_report, resp, rd, image, read, settings.report_rows, metrics, quality
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_CSP})


async def _drumond_report(
    eid: str, data: bytes, svc: ExplanationsDep, registry: RegistryDep
) -> HTMLResponse:
    """A Drumond model's report: the answer, the ambiguity banner, and per matched
    prototype its chance, nearest training images and neighbourhood's classes."""
    resp = DrumondExplainResponse.model_validate_json(data)
    jpeg = await svc.cache.get(eid, "image")
    if jpeg is None:
        raise svc._missing(eid)
    image = await svc.run(render.decode_jpeg, jpeg)
    ref = f"{resp.model.name}@{resp.model.version}"
    try:
        m, _ = await registry.any_manifest(ref)
        read = functools.partial(registry.store.nearest_image_bytes, m)
        metrics = m.metrics
    except ProtoPNetError:  # the version left the store: the report renders without them
        read, metrics = None, None
    html = await svc.run(render_drumond_report, resp, image, read, metrics)
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_CSP})
