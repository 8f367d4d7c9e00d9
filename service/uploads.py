"""Reading an upload: the image bytes from a multipart field or a raw body, within the
configured limits, with any form fields sent beside them."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import BadOptionError, EmptyImageError, TooLargeError, UnsupportedMediaError
from service.settings import Settings

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
