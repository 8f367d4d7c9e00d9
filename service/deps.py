"""Request dependencies as Annotated aliases, the API-key check, and upload reading."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.cache import ExplanationCache
from service.errors import (
    BadOptionError,
    EmptyImageError,
    TooLargeError,
    UnauthorizedError,
    UnsupportedMediaError,
    validation_message,
)
from service.explanations import ExplanationService
from service.registry import ModelRegistry
from service.schemas import HeatmapMode
from service.settings import Settings


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
CacheDep = Annotated[ExplanationCache, Depends(get_cache)]
ExplanationsDep = Annotated[ExplanationService, Depends(get_explanations)]

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


async def require_api_key(request: Request) -> None:
    """When API keys are configured, every resource route needs one of them."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    given = request.headers.get(settings.api_key_header)
    if given is None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
    if given is None:
        raise UnauthorizedError(
            f"this service needs an API key: send it in the {settings.api_key_header} header "
            "(or as Authorization: Bearer <key>)"
        )
    if not any(secrets.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        raise UnauthorizedError(f"the API key in {settings.api_key_header} is not valid")


ApiKey = Depends(require_api_key)


# -- uploads --------------------------------------------------------------------------

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and small option fields around the image


@dataclass
class Upload:
    """The image bytes and any form fields sent with them."""

    data: bytes
    content_type: str
    fields: dict[str, str] = field(default_factory=dict)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.4g} MiB"


async def read_body(request: Request, limit: int, allowed: int | None = None) -> bytes:
    """The whole body, refusing more than ``allowed`` bytes (declared or streamed; default
    ``limit``). Messages name ``limit``, the configured size a client must stay within
    (a multipart body is allowed ``MULTIPART_OVERHEAD`` more for its framing)."""
    allowed = limit if allowed is None else allowed
    stated = f"the limit is {limit} bytes ({_mib(limit)}, PROTOPNET_MAX_UPLOAD_BYTES)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > allowed:
        raise TooLargeError(
            f"the request body is {int(declared)} bytes ({_mib(int(declared))}); {stated}",
            headers={"Connection": "close"},
        )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > allowed:
            raise TooLargeError(
                f"the request body is over {len(buf)} bytes; {stated}",
                headers={"Connection": "close"},
            )
    return bytes(buf)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


ACCEPTED = (
    "send the image as multipart/form-data field 'image' (curl -F image=@photo.jpg) or as the "
    "raw body with an image/* or application/dicom content type (curl -H "
    "'Content-Type: image/jpeg' --data-binary @photo.jpg)"
)
RAW_TYPES = ("application/dicom",)  # raw bodies accepted besides image/*


async def read_upload(request: Request, settings: Settings) -> Upload:
    """The image from a multipart field ``image`` or from a raw image/* (or DICOM) body."""
    limit = settings.max_upload_bytes
    media = _media_type(request)
    if media == "multipart/form-data":
        body = await read_body(request, limit, allowed=limit + MULTIPART_OVERHEAD)
        if not body:
            raise EmptyImageError(f"the request body is empty; {ACCEPTED}")
        return await _parse_multipart(request, body, limit)
    body = await read_body(request, limit)
    if not body:
        raise EmptyImageError(f"the request body is empty; {ACCEPTED}")
    if not (media.startswith("image/") or media in RAW_TYPES):
        shown = media or "(none)"
        raise UnsupportedMediaError(f"content type {shown} is not accepted; {ACCEPTED}")
    return Upload(data=body, content_type=media)


async def _parse_multipart(request: Request, body: bytes, limit: int) -> Upload:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=32)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadOptionError(f"the multipart body could not be parsed: {e.message}") from None
    try:
        image = form.get("image")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if image is None:
            got = ", ".join(sorted(set(form.keys()))) or "none"
            raise BadOptionError(f"the multipart body has no field 'image' (fields sent: {got})")
        if not isinstance(image, UploadFile):
            raise BadOptionError("the multipart field 'image' must be a file, not a text value")
        data = await image.read()
        if len(data) > limit:
            raise TooLargeError(
                f"the image is {len(data)} bytes ({_mib(len(data))}); the limit is {limit} "
                f"bytes ({_mib(limit)}, PROTOPNET_MAX_UPLOAD_BYTES)"
            )
        if not data:
            raise EmptyImageError(f"the multipart field 'image' is empty; {ACCEPTED}")
        return Upload(data=data, content_type=image.content_type or "", fields=fields)
    finally:
        await form.close()


# -- options --------------------------------------------------------------------------


class ExplainOptions(BaseModel):
    model: str | None = Field(default=None, description="name, name@version or name@alias")
    top_classes: int = 3  # range-checked against the settings in resolve_options
    top_prototypes: int = 10
    heatmaps: HeatmapMode = "url"


_OPTION_TYPES: dict[str, TypeAdapter[Any]] = {
    "model": TypeAdapter(str),
    "top_classes": TypeAdapter(int),
    "top_prototypes": TypeAdapter(int),
    "heatmaps": TypeAdapter(HeatmapMode),
}


def resolve_options(
    settings: Settings, query: dict[str, Any], form: dict[str, str] | None = None
) -> ExplainOptions:
    """Query parameters, else form fields, else the settings' defaults; checked."""
    values: dict[str, Any] = {}
    for name, adapter in _OPTION_TYPES.items():
        raw = query.get(name)
        source = "query"
        if raw is None and form and name in form:
            raw, source = form[name], "form"
        if raw is None:
            continue
        try:
            values[name] = adapter.validate_python(raw, strict=False)
        except ValidationError as e:
            errs = [dict(err, loc=(source, name), input=raw) for err in e.errors()]
            raise BadOptionError(validation_message(errs)) from None
    if values.get("model") is not None and not values["model"].strip():
        raise BadOptionError(
            "model is empty: give name, name@version or name@alias, or leave the option "
            f"out for the default model ({settings.default_model})"
        )
    values.setdefault("top_classes", settings.default_top_classes)
    values.setdefault("top_prototypes", settings.default_top_prototypes)
    opts = ExplainOptions(**values)
    limits = (
        ("top_classes", opts.top_classes, settings.max_top_classes),
        ("top_prototypes", opts.top_prototypes, settings.max_top_prototypes),
    )
    for name, value, hi in limits:
        if not 1 <= value <= hi:
            raise BadOptionError(f"{name} must be between 1 and {hi} (got {value})")
    return opts
