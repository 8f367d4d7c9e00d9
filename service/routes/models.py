"""GET /models, /models/{name}, its prototypes and their pictures from the store; with an
admin key, PUT an alias through the promotion gate and POST a revision."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from model_store import gate
from model_store.store import ModelStore, check_name
from service.card import render_card
from service.deps import (
    AdminKey,
    ApiKey,
    ModelPath,
    PrototypePath,
    RegistryDep,
    RevisionsDep,
    SettingsDep,
    root_of,
)
from service.errors import BadOptionError, ErrorBody, NotFoundError, request_id_of
from service.report import REPORT_CSP
from service.schemas import (
    AliasMove,
    AliasMoved,
    Box,
    GateFigure,
    ImageKind,
    LatentCell,
    ModelDetail,
    ModelList,
    ModelListEntry,
    PrototypeInfo,
    PrototypeLinks,
    PrototypeList,
    Revision,
    RevisionRequest,
    Size,
)

router = APIRouter(prefix="/models", tags=["models"], dependencies=[ApiKey])


@router.get("", response_model=ModelList)
async def list_models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    """Every model in the store with its versions and aliases."""
    entries = await asyncio.to_thread(registry.store.list)
    loaded = registry.loaded_refs
    return ModelList(
        default_model=settings.default_model,
        models=[
            ModelListEntry(
                name=e.name,
                versions=e.versions,
                aliases=e.aliases,
                loaded=[r.split("@", 1)[1] for r in loaded if r.split("@", 1)[0] == e.name],
            )
            for e in entries
        ],
    )


@router.get("/{name}", response_model=ModelDetail)
async def get_model(name: ModelPath, registry: RegistryDep) -> ModelDetail:
    """One version (``name`` = name, name@version or name@alias): classes, prototypes,
    trunk, accuracy."""
    m, sha = await registry.manifest(name)
    aliases = await asyncio.to_thread(registry.store.aliases, m.name)
    arch = m.architecture
    counts = Counter(m.class_names[p.class_index] for p in m.prototypes)
    accuracy = m.metrics.test_accuracy
    if accuracy is None:
        accuracy = m.metrics.val_accuracy
    return ModelDetail(
        name=m.name,
        version=m.version,
        manifest_sha256=sha,
        aliases=sorted(a for a, v in aliases.items() if v == m.version),
        trunk=arch.backbone,
        image_size=m.preprocessing.img_size,
        num_classes=len(m.class_names),
        classes=m.class_names,
        num_prototypes=len(m.prototypes),
        prototypes_per_class={c: counts.get(c, 0) for c in m.class_names},
        prototype_shape=[arch.prototype_depth, *arch.prototype_size],
        activation=arch.activation,
        preprocessing=m.preprocessing.model_dump(mode="json"),
        metrics=m.metrics.model_dump(mode="json"),
        accuracy=accuracy,
        created_at=m.created_at.isoformat(),
        source=m.source,
        familiarity=None if m.familiarity is None else m.familiarity.model_dump(mode="json"),
        interpretability=(
            None if m.interpretability is None else m.interpretability.model_dump(mode="json")
        ),
        lineage=None if m.lineage is None else m.lineage.model_dump(mode="json"),
    )


@router.get("/{name}/history")
async def alias_history(name: ModelPath, registry: RegistryDep) -> list[dict]:
    """Every alias move of the model, oldest first: alias, version, previous, at, by, and
    for a move the promotion gate refused and ``--force`` let through, ``forced`` and the
    figures it was forced past (``python -m model_store history``)."""
    m, _ = await registry.manifest(name)
    return await asyncio.to_thread(registry.store.alias_history, m.name)


@router.get("/{name}/card", response_class=HTMLResponse)
async def model_card(name: ModelPath, registry: RegistryDep) -> HTMLResponse:
    """The model card (one self-contained HTML page, the report's Content-Security-Policy):
    what the version is, its accuracy per class, its prototypes' quality, and for each
    class its prototypes with their training patches, source images and nearest training
    patches, weak ones flagged."""
    m, _ = await registry.manifest(name)
    aliases = await asyncio.to_thread(registry.store.aliases, m.name)
    store = registry.store

    def picture(j: int, kind: str) -> bytes | None:
        if kind == "nearest":
            return store.nearest_image_bytes(m, j)
        return store.prototype_image_bytes(m, j, kind)  # type: ignore[arg-type]

    html = await asyncio.to_thread(
        render_card, m, sorted(a for a, v in aliases.items() if v == m.version), picture
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_CSP})


@router.get("/{name}/prototypes", response_model=PrototypeList)
async def list_prototypes(
    name: ModelPath, registry: RegistryDep, request: Request
) -> PrototypeList:
    """Every prototype: its class, where it came from, links to its pictures."""
    m, _ = await registry.manifest(name)
    base = f"{root_of(request)}/models/{m.name}@{m.version}/prototypes"
    out = []
    for p in m.prototypes:
        links = None
        if p.has_images:
            u = f"{base}/{p.index}.png?kind="
            links = PrototypeLinks(
                patch=u + "patch", source=u + "source", activation=u + "activation"
            )
        out.append(
            PrototypeInfo(
                prototype=p.index,
                class_index=p.class_index,
                label=m.class_names[p.class_index],
                source_image_id=p.source_image_id,
                source_size=Size(width=p.source_size[0], height=p.source_size[1])
                if p.source_size
                else None,
                latent_cell=LatentCell(h=p.patch_hw[0], w=p.patch_hw[1]) if p.patch_hw else None,
                box=Box(x0=p.box[0], y0=p.box[1], x1=p.box[2], y1=p.box[3]) if p.box else None,
                distance=p.distance,
                pruned=p.pruned,
                images=links,
            )
        )
    return PrototypeList(name=m.name, version=m.version, prototypes=out)


def _store_png(data: bytes, ttl_s: int) -> Response:
    # A published version's pictures never change; anyone may keep them a while.
    return Response(
        data, media_type="image/png", headers={"Cache-Control": f"public, max-age={ttl_s}"}
    )


@router.get(
    "/{name}/prototypes/{j}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "a PNG from the store"}},
)
async def prototype_image(
    name: ModelPath,
    j: PrototypePath,
    registry: RegistryDep,
    settings: SettingsDep,
    kind: Annotated[ImageKind, Query(description="patch, source or activation")] = "patch",
) -> Response:
    """Prototype j's picture from its training image, as published in the store (read
    from there: no model is loaded for it)."""
    m, _ = await registry.manifest(name)
    data = await asyncio.to_thread(registry.store.prototype_image_bytes, m, j, kind)
    if data is None:
        raise NotFoundError(f"model {m.name}@{m.version} has no {kind} image for prototype {j}")
    return _store_png(data, settings.cache_ttl_s)


@router.get(
    "/{name}/prototypes/{j}/nearest.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "a PNG from the store"}},
)
async def nearest_images(
    name: ModelPath, j: PrototypePath, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Prototype j's nearest training images (a Drumond model's) or patches (a
    ProtoPNet's), side by side, as export drew them into the store."""
    m, _ = await registry.any_manifest(name)
    data = await asyncio.to_thread(registry.store.nearest_image_bytes, m, j)
    if data is None:
        raise NotFoundError(f"model {m.name}@{m.version} has no nearest images for prototype {j}")
    return _store_png(data, settings.cache_ttl_s)


# -- changing the store (admin keys) ----------------------------------------------------

AliasPath = Annotated[str, Path(description="the alias to point, e.g. production")]
RevisionId = Annotated[str, Path(description="the id a POST of a revision answered")]


def _plain_name(name: str) -> str:
    if "@" in name:
        raise BadOptionError(
            f"give the model's name here, not a version: {name.split('@', 1)[0]!r}, "
            "with the version in the body"
        )
    return name


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasMoved,
    dependencies=[AdminKey],
    responses={409: {"description": "refused by the promotion gate: the error and the "
                     "comparison, the alias unmoved"}},
)  # fmt: skip
async def move_alias(
    name: ModelPath, alias: AliasPath, body: AliasMove, registry: RegistryDep, request: Request
) -> AliasMoved | JSONResponse:
    """Point ``alias`` at ``version`` through the promotion gate (``python -m model_store
    promote``): when the alias points at another version, the candidate is compared with
    it and the move refused (409) if its test accuracy or any prototype-quality figure is
    worse by more than ``tolerance``, unless ``force``; the alias history records who
    moved it and, when forced, past which figures."""
    done = await asyncio.to_thread(
        gate.promote, registry.store, _plain_name(name), body.version, alias,
        body.tolerance, body.force, body.by or "http",
    )  # fmt: skip
    moved = AliasMoved(
        name=done.name, alias=done.alias, version=done.candidate, previous=done.previous,
        promoted=done.promoted, forced=done.forced, failed=done.failed,
        tolerance=done.tolerance,
        comparison=[GateFigure(**vars(r)) for r in done.rows],
    )  # fmt: skip
    if done.promoted:
        return moved
    error = ErrorBody(
        code="gate_refused", message=done.refusal(), request_id=request_id_of(request)
    )
    return JSONResponse({"error": error.model_dump(), "promotion": moved.model_dump()}, 409)


def _revision(record: dict, request: Request) -> Revision:
    name = record["model"].split("@", 1)[0]
    return Revision(**record, url=f"{root_of(request)}/models/{name}/revisions/{record['id']}")


@router.post("/{name}/revisions", response_model=Revision, status_code=202, dependencies=[AdminKey])
async def start_revision(
    name: ModelPath,
    body: RevisionRequest,
    registry: RegistryDep,
    revisions: RevisionsDep,
    request: Request,
    response: Response,
) -> Revision:
    """Remove prototypes from ``name`` (name@version or an alias: the version it points
    at now) and refit its last layer on the training split, publishing a new version with
    its lineage (``python -m training revise``). Answers 202 at once: the refit takes
    minutes, the record at ``url`` says when it is done and what was published. A request
    the revision cannot honour (an unknown prototype, a class left without prototypes, a
    model without its training data recorded) is refused here, with a 422."""
    m, _ = await registry.manifest(name)
    if body.name is not None:
        check_name("model", body.name)
    for alias in body.aliases:
        ModelStore._check_alias_name(alias)
    record = revisions.start(
        m, body.remove, body.reason, body.name, body.aliases, body.by or "http"
    )
    out = _revision(record, request)
    response.headers["Location"] = out.url or ""
    return out


@router.get("/{name}/revisions/{rid}", response_model=Revision)
async def get_revision(
    name: ModelPath, rid: RevisionId, revisions: RevisionsDep, request: Request
) -> Revision:
    """A revision's record: running, done (what was published, test accuracy before and
    after) or failed (the error, in the command line's words)."""
    plain = _plain_name(name)
    record = await asyncio.to_thread(revisions.record, plain, rid)
    if record is None:
        raise NotFoundError(f"no revision {rid!r} of {plain} in this store")
    return _revision(record, request)
