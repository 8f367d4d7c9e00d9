"""Request dependencies as Annotated aliases: the app's objects, path parameters, the
API-key check, and the upload with its options (declared once, ``ExplainOptions``)."""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from service.cache import ExplanationCache
from service.errors import BadOptionError, ForbiddenError, UnauthorizedError, validation_message
from service.explanations import ExplanationService
from service.registry import ModelRegistry
from service.revisions import Revisions
from service.schemas import HeatmapMode, MapMethod
from service.settings import Settings
from service.uploads import Upload, read_upload


# The getters are coroutines on purpose: FastAPI runs a plain ``def`` dependency on its
# thread pool, i.e. a thread hand-off there and back for each one on every request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_cache(request: Request) -> ExplanationCache:
    return request.app.state.cache


async def get_explanations(request: Request) -> ExplanationService:
    return request.app.state.explanations


async def get_revisions(request: Request) -> Revisions:
    return request.app.state.revisions


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
CacheDep = Annotated[ExplanationCache, Depends(get_cache)]
ExplanationsDep = Annotated[ExplanationService, Depends(get_explanations)]
RevisionsDep = Annotated[Revisions, Depends(get_revisions)]

# Path parameters shared by several routes, described once for the API docs.
ModelPath = Annotated[
    str,
    Path(
        description="a model: name (its 'latest' alias, else its newest version), "
        "name@version or name@alias"
    ),
]


def _canonical_index(value: object) -> object:
    """Digits only, no sign, no spaces, no leading zeros: "-0" and " 1" name no prototype."""
    if isinstance(value, str) and not re.fullmatch(r"0|[1-9][0-9]{0,8}", value):
        raise ValueError("a prototype index is a whole number written in digits, like 0 or 12")
    return value


PrototypePath = Annotated[
    int,
    BeforeValidator(_canonical_index),
    Path(description="a prototype's index in the model, as the JSON's prototype fields give it"),
]


def root_of(request: Request) -> str:
    """Path prefix for links the service hands out (behind a proxy: its root_path)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _given_key(request: Request, settings: Settings) -> str | None:
    given = request.headers.get(settings.api_key_header)
    if given is None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
    return given


def _matches(given: str, keys: list[str]) -> bool:
    return any(secrets.compare_digest(given.encode(), k.encode()) for k in keys)


async def require_api_key(request: Request) -> None:
    """When API keys are configured, every resource route needs one of them (an admin
    key counts as one)."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    given = _given_key(request, settings)
    if given is None:
        raise UnauthorizedError(
            f"this service needs an API key: send it in the {settings.api_key_header} header "
            "(or as Authorization: Bearer <key>)"
        )
    if not _matches(given, [*settings.api_keys, *settings.admin_keys]):
        raise UnauthorizedError(f"the API key in {settings.api_key_header} is not valid")


async def require_admin_key(request: Request) -> None:
    """The routes that change the store (promote, revise) need an admin key; with none
    configured they are off."""
    settings: Settings = request.app.state.settings
    if not settings.admin_keys:
        raise ForbiddenError(
            "changing the store over HTTP is off on this service: start it with "
            "PROTOPNET_ADMIN_KEYS set (and a writable store), or use `python -m model_store "
            "promote` and `python -m training revise`"
        )
    given = _given_key(request, settings)
    if given is None:
        raise UnauthorizedError(
            f"changing the store needs an admin key: send it in the "
            f"{settings.api_key_header} header (or as Authorization: Bearer <key>)"
        )
    if not _matches(given, settings.admin_keys):
        raise ForbiddenError(
            f"the key in {settings.api_key_header} is not an admin key (PROTOPNET_ADMIN_KEYS)"
        )


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)


# -- options --------------------------------------------------------------------------


class PredictOptions(BaseModel):
    """The options of /predict, from the query string or form fields (the query wins);
    unset ones take the settings' defaults (``resolve_options``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="name, name@version or name@alias")
    top_classes: int | None = Field(
        default=None, description="classes ranked (default 3, PROTOPNET_DEFAULT_TOP_CLASSES)"
    )


class ExplainOptions(PredictOptions):
    """The options of /explain: /predict's and two more."""

    top_prototypes: int | None = Field(
        default=None,
        description="most activated prototypes shown (default 10, PROTOPNET_DEFAULT_TOP_PROTOTYPES)",
    )
    heatmaps: HeatmapMode | None = Field(
        default=None, description="url (default): links; inline: base64 PNGs; none"
    )
    faithfulness: bool | None = Field(
        default=None,
        description="true: each shown box's deletion test against random boxes of its size "
        "(a receipt per row; one more forward per box and random box)",
    )
    method: MapMethod | None = Field(
        default=None,
        description="how the shown prototypes' maps and boxes are made: upsample (default, "
        "the paper's), smoothgrad (the similarity's input gradient over 16 noisy copies) or "
        "prp (the similarity's relevance propagated back to the pixels)",
    )


@dataclass(frozen=True)
class Options:
    """Options resolved: every one set, within the settings' limits."""

    model: str | None
    top_classes: int
    top_prototypes: int
    heatmaps: HeatmapMode
    faithfulness: bool
    method: MapMethod = "upsample"


@functools.lru_cache(maxsize=32)
def _adapter(kind: type[BaseModel], name: str) -> TypeAdapter[Any]:
    return TypeAdapter(kind.model_fields[name].annotation)  # type: ignore[arg-type]


def resolve_options(
    settings: Settings, kind: type[PredictOptions], *sources: tuple[str, Mapping[str, Any]]
) -> Options:
    """The options ``kind`` declares, each from the first source that gives it (in order,
    e.g. ("query", ...), ("form", ...)), else the settings' default; checked."""
    values: dict[str, Any] = {}
    for name in kind.model_fields:
        for source, given in sources:
            raw = given.get(name)
            if raw is None:
                continue
            try:
                values[name] = _adapter(kind, name).validate_python(raw, strict=False)
            except ValidationError as e:
                errs = [dict(err, loc=(source, name), input=raw) for err in e.errors()]
                raise BadOptionError(validation_message(errs)) from None
            break
    if values.get("model") is not None and not values["model"].strip():
        raise BadOptionError(
            "model is empty: give name, name@version or name@alias, or leave the option "
            f"out for the default model ({settings.default_model})"
        )
    opts = Options(
        model=values.get("model"),
        top_classes=values.get("top_classes") or settings.default_top_classes,
        top_prototypes=values.get("top_prototypes") or settings.default_top_prototypes,
        heatmaps=values.get("heatmaps") or "url",
        faithfulness=bool(values.get("faithfulness")),
        method=values.get("method") or "upsample",
    )
    limits = (
        ("top_classes", values.get("top_classes"), settings.max_top_classes),
        ("top_prototypes", values.get("top_prototypes"), settings.max_top_prototypes),
    )
    for name, value, hi in limits:
        if value is not None and not 1 <= value <= hi:
            raise BadOptionError(f"{name} must be between 1 and {hi} (got {value})")
    return opts


async def explain_request(
    request: Request, settings: SettingsDep, query: Annotated[ExplainOptions, Query()]
) -> tuple[Upload, Options]:
    """The upload and the /explain options: the query's (parsed by FastAPI into
    ``ExplainOptions``), else the form's, else the settings' defaults."""
    upload = await read_upload(request, settings)
    given = query.model_dump(exclude_none=True)
    opts = resolve_options(settings, ExplainOptions, ("query", given), ("form", upload.fields))
    return upload, opts


async def predict_request(
    request: Request, settings: SettingsDep, query: Annotated[PredictOptions, Query()]
) -> tuple[Upload, Options]:
    """``explain_request`` for /predict's options."""
    upload = await read_upload(request, settings)
    given = query.model_dump(exclude_none=True)
    opts = resolve_options(settings, PredictOptions, ("query", given), ("form", upload.fields))
    return upload, opts


ExplainRequest = Annotated[tuple[Upload, Options], Depends(explain_request)]
PredictRequest = Annotated[tuple[Upload, Options], Depends(predict_request)]


def form_fields(kind: type[PredictOptions]) -> dict[str, Any]:
    """The OpenAPI properties of ``kind``'s options as multipart form fields."""
    return kind.model_json_schema()["properties"]
