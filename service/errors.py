"""One JSON error shape for every failure, and the mapping of domain errors to HTTP.

    {"error": {"code": "unsupported_media_type", "message": "...", "request_id": "..."}}

Library code raises ``protopnet.errors`` exceptions; the service's own input checks raise
``ServiceError`` subclasses. Only this module and the routes know HTTP status codes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model_store.errors import InvalidNameError, WrongKindError
from protopnet.errors import ProtoPNetError, UnknownNameError
from service.batcher import BatcherClosed, BatcherFull

log = logging.getLogger("service")


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """The shape of every error the service answers."""

    error: ErrorBody


class ServiceError(Exception):
    """An error with its HTTP status and a stable machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadImageError(ServiceError):
    status, code = 400, "corrupt_image"


class EmptyImageError(ServiceError):
    status, code = 400, "empty_image"


class UnsupportedMediaError(ServiceError):
    status, code = 415, "unsupported_media_type"


class TooLargeError(ServiceError):
    status, code = 413, "payload_too_large"


class TooManyPixelsError(ServiceError):
    status, code = 413, "too_many_pixels"


class BadOptionError(ServiceError):
    status, code = 422, "invalid_option"


class NotFoundError(ServiceError):
    status, code = 404, "not_found"


class UnauthorizedError(ServiceError):
    status, code = 401, "unauthorized"


class ForbiddenError(ServiceError):
    status, code = 403, "forbidden"


class QueueFullError(ServiceError):
    status, code = 503, "overloaded"


class NotReadyError(ServiceError):
    status, code = 503, "not_ready"


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(code=code, message=message, request_id=request_id_of(request))
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


ECHO_CHARS = 40  # of a bad value repeated in an error message


def shown_value(value: Any) -> str:
    """``repr(value)``, cut to ECHO_CHARS: an error names what was sent without echoing
    a 5000-digit option back in full."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic's errors as one sentence per bad field, naming the value that was sent."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
        where = " ".join(loc) if loc else "request"
        msg = e.get("msg", "invalid")
        if "input" in e and e.get("type") != "missing":
            parts.append(f"{where}: {msg} (got {shown_value(e['input'])})")
        else:
            parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request"


CLIENT_CLOSED = 499  # nginx's status for a request its client abandoned

_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_option",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through ``error_response``: one shape, the right status."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(UnknownNameError)
    async def _unknown(request: Request, exc: UnknownNameError) -> JSONResponse:
        return error_response(request, 404, f"unknown_{exc.kind}", str(exc))

    @app.exception_handler(InvalidNameError)
    async def _bad_name(request: Request, exc: InvalidNameError) -> JSONResponse:
        return error_response(request, 422, "invalid_option", str(exc))

    @app.exception_handler(WrongKindError)
    async def _wrong_kind(request: Request, exc: WrongKindError) -> JSONResponse:
        # The version exists and is sound; this route cannot serve its kind of model.
        return error_response(request, 409, "wrong_model_kind", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_option", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        if exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return error_response(request, exc.status_code, code, message, headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client closed the connection before its request body arrived: nobody will
        # read an answer. Counted under nginx's 499 ("client closed request"), not 5xx.
        log.info(
            "client disconnected before its request body arrived",
            extra={"request_id": request_id_of(request), "path": request.url.path},
        )
        return error_response(request, CLIENT_CLOSED, "client_closed_request", "client left")

    @app.exception_handler(BatcherFull)
    async def _full(request: Request, exc: BatcherFull) -> JSONResponse:
        request.app.state.metrics.rejected.inc()
        message = f"the model is busy: {exc}; retry after {exc.retry_after} s"
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(request, 503, QueueFullError.code, message, headers)

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        # Unloaded (max_loaded_models) or shutting down while the request waited.
        message = f"{exc}; retry after 1 s"
        return error_response(request, 503, QueueFullError.code, message, {"Retry-After": "1"})

    @app.exception_handler(ProtoPNetError)
    async def _domain(request: Request, exc: ProtoPNetError) -> JSONResponse:
        # A model or store problem on our side (e.g. a tampered artifact), not the client's:
        # 503, since another replica or a repaired version may serve it; the message names
        # the damaged file.
        log.error("domain error: %s", exc, extra={"request_id": request_id_of(request)})
        return error_response(request, 503, "model_unavailable", str(exc))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request_id_of(request)})
        return error_response(request, 500, "internal_error", "internal error; see the server log")
