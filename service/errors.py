"""The service's failures, each with its HTTP status, error type and code.

Every failure reaches the client as the one envelope
``{"error": {"message", "type", "param", "code"}}``, built by :func:`error_response` alone
(from the handlers of :mod:`service.app` and the middleware of :mod:`service.middleware`).
``type`` is the broad class a client branches on; ``code`` is the precise reason; the
``x-should-retry`` header says whether sending the same request again can help.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from service.protocol import ErrorDetail, ErrorResponse
from service.schema_words import accepted, shown

#: The response header that tells a client whether retrying this very request can help
#: (the convention the anthropic and openai SDKs honour).
SHOULD_RETRY_HEADER = "x-should-retry"


class ServiceError(Exception):
    """A failure with a known status; subclasses fix the status, type and default code.

    ``retryable``: whether the same request may succeed if sent again (sent as
    ``x-should-retry``); None leaves it to the client's status rules.
    """

    status_code = 500
    type = "server_error"
    code = "internal_error"
    retryable: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequestError(ServiceError):
    """The body is not JSON at all (400)."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_json"


class AuthenticationError(ServiceError):
    """A key is configured and the request's bearer token is missing or wrong (401)."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLargeError(ServiceError):
    """The input or the estimated response is over a configured limit (413)."""

    status_code = 413
    type = "invalid_request_error"
    code = "too_large"


class InvalidFieldError(ServiceError):
    """A field is invalid for the API or for the loaded model (422); ``param`` names it."""

    status_code = 422
    type = "invalid_request_error"
    code = "invalid_field"


class UnsupportedMediaTypeError(ServiceError):
    """A JSON route got a body that is not declared as JSON (415)."""

    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class NonFiniteResultError(ServiceError):
    """The decomposition produced NaN or infinity, which JSON cannot carry (422)."""

    status_code = 422
    type = "invalid_request_error"
    code = "non_finite_result"


class QueueFullError(ServiceError):
    """The worker's queue is full (429); ``Retry-After`` says when to come back."""

    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"
    retryable = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NotReadyError(ServiceError):
    """The model is not loaded (yet, or any more) (503)."""

    status_code = 503
    type = "unavailable_error"
    code = "not_ready"
    retryable = True

    def __init__(self, message: str = "the model is not loaded yet; retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class OutOfMemoryError(ServiceError):
    """The accelerator ran out of memory on this request; caches were freed (503). The
    same request would redo the same work and likely fail again: not to be retried."""

    status_code = 503
    type = "unavailable_error"
    code = "out_of_memory"
    retryable = False


class RequestTimeoutError(ServiceError):
    """The request waited and ran past ``DEPASS_REQUEST_TIMEOUT_S`` (504); sent again it
    would take as long: not to be retried."""

    status_code = 504
    type = "timeout_error"
    code = "timeout"
    retryable = False


class ClientDisconnectedError(ServiceError):
    """The client went away while its request was queued; nothing is sent back."""

    status_code = 499
    type = "invalid_request_error"
    code = "client_disconnected"


def error_response(error: ServiceError) -> JSONResponse:
    """The one error envelope of every failure, with its status and headers."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    headers = dict(error.headers)
    if error.retryable is not None:
        headers[SHOULD_RETRY_HEADER] = "true" if error.retryable else "false"
    body = ErrorResponse(error=detail).model_dump()
    return JSONResponse(body, status_code=error.status_code, headers=headers)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def from_http_exception(exc: HTTPException, message: str | None = None) -> ServiceError:
    """The service error of a starlette/FastAPI :class:`HTTPException` (404, 405, ...)."""
    error = ServiceError(
        message or str(exc.detail),
        code=getattr(exc, "code", None)
        or _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}"),
        headers=dict(exc.headers or {}),
    )
    error.status_code = exc.status_code
    error.type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return error


class BodyTooLargeError(HTTPException):
    """The request body passes ``DEPASS_MAX_BODY_BYTES`` (413), raised while reading it.

    An :class:`HTTPException`, so that FastAPI's body parsing lets it through unchanged.
    """

    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413, detail=f"the request body is over the limit of {limit} bytes"
        )


class InvalidJSONError(HTTPException):
    """The body is not JSON the service accepts (400): not UTF-8, nested too deeply, or
    holding a lone surrogate. An :class:`HTTPException` for the same reason as above."""

    code = "invalid_json"

    def __init__(self, message: str) -> None:
        super().__init__(status_code=400, detail=f"the body is not valid JSON: {message}")


_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([A-Za-z_][A-Za-z0-9_]*): ")
_QUOTED_FIELD = re.compile(r"'([a-z_]+)'")
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


def invalid_fields(
    errors: Sequence[Mapping[str, Any]], model: type[BaseModel] | None = None
) -> InvalidFieldError:
    """One 422 from pydantic's error list, naming the first offending field.

    Each refused field of ``model`` (the route's body) reads as one sentence, whatever
    pydantic tried (a union's members, a bound and a type): the value that was wrong and
    what the field accepts (:mod:`service.schema_words`). A cross-field error (location
    empty) names its field in its message, as ``"field: ..."`` or in quotes.
    """
    parts: list[str] = []
    first: str | None = None
    done: set[str] = set()
    for error in errors:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        location = [p for p in error.get("loc", ()) if p != "body"]
        param: str | None = location[0] if location and isinstance(location[0], str) else None
        if param is not None and param in done:
            continue  # one sentence per field
        expected = accepted(model, param) if model is not None and param is not None else None
        if param is not None and expected is not None:
            done.add(param)
            parts.append(_field_sentence(param, error, location, expected))
            first = first or param
            continue
        if param is None and (match := _FIELD_PREFIX.match(message)):
            param, message = match.group(1), message[match.end() :]
        if param is None and (match := _QUOTED_FIELD.search(message)):
            param = match.group(1)
        if error.get("type") == "missing" and not location:
            message = "a JSON object body is required"
        elif error.get("type") in _NOT_AN_OBJECT and not location:
            message = "the body must be a JSON object"
        parts.append(f"{param}: {message}" if param else message)
        first = first or param
    if len(parts) > 5:
        parts = [*parts[:5], f"and {len(parts) - 5} more"]
    return InvalidFieldError("; ".join(parts), param=first)


def _is_member_name(part: str) -> bool:
    """Whether a location part names a union member (``int``, ``list[constrained-int]``),
    not a field."""
    return part in _MEMBER_NAMES or not part.isidentifier()


_MEMBER_NAMES = {"int", "str", "float", "bool", "list", "dict", "none", "function-after"}


def _field_sentence(
    param: str, error: Mapping[str, Any], location: list[Any], expected: str
) -> str:
    """``field: <value> is not accepted; expected <what the field accepts>``."""
    # the place inside the field, without the union member names pydantic adds
    inner = [p for p in location[1:] if isinstance(p, int) or not _is_member_name(p)]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner)
    if error.get("type") == "missing":
        wrong = f"{where.lstrip('.')} is missing" if where else "is missing"
    else:
        wrong = f"{shown(error.get('input'))} is not accepted"
        if where:
            wrong += f" (at {param}{where})"
    return f"{param}: {wrong}; expected {expected}"
