"""The SDK's error tree.

``DePassError`` > ``APIError`` > ``APIStatusError`` (one class per status;
``InternalServerError`` > ``ServiceTimeoutError`` for 504) and ``APIConnectionError`` >
``APITimeoutError``. A status error carries the service's envelope
fields: ``message``, ``type``, ``param`` and ``code``.
"""

from __future__ import annotations

from typing import Any

import httpx


class DePassError(Exception):
    """Every error raised by the SDK."""


class APIError(DePassError):
    """A request to the service failed.

    Attributes:
        message: what went wrong.
        request: the failed request.
        body: the parsed response body, when there was one.
    """

    def __init__(self, message: str, request: httpx.Request, *, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIStatusError(APIError):
    """The service answered with a 4xx or 5xx status.

    Attributes:
        status_code: the HTTP status.
        type: the envelope's broad error class, e.g. ``"invalid_request_error"``.
        param: the request field at fault, if any.
        code: the precise reason, e.g. ``"queue_full"``.
    """

    def __init__(self, message: str, response: httpx.Response, *, body: Any = None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: str | None = error.get("code")

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status_code} {self.message}{where}"


class BadRequestError(APIStatusError):
    """400: the body is not valid JSON."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class NotFoundError(APIStatusError):
    """404: no such route."""


class PayloadTooLargeError(APIStatusError):
    """413: the input, the body, the estimated response or the estimated memory
    (``code == "memory_budget"``) is over the service's limits."""


class UnprocessableEntityError(APIStatusError):
    """422: a field is invalid; ``param`` names it."""


class RateLimitError(APIStatusError):
    """429: the service's queue is full."""


class InternalServerError(APIStatusError):
    """5xx: the service failed, is not ready (``code == "not_ready"``), or ran out of
    memory (``"out_of_memory"``)."""


class ServiceTimeoutError(InternalServerError):
    """504: the request ran past the service's own deadline (``DEPASS_REQUEST_TIMEOUT_S``);
    not retried, since it would take as long again. Ask for less, or raise the deadline."""


class APIConnectionError(APIError):
    """The service could not be reached, or the connection broke; names the URL."""

    def __init__(self, request: httpx.Request, message: str = "connection error") -> None:
        super().__init__(message, request)


class APITimeoutError(APIConnectionError):
    """The request timed out on the client's side (the ``timeout`` of the client); a read
    timeout is not retried, since the service may still be working on the request."""

    def __init__(self, request: httpx.Request, detail: str = "") -> None:
        super().__init__(
            request, f"request to {request.url} timed out" + (f" ({detail})" if detail else "")
        )


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    504: ServiceTimeoutError,
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The error for a failed response, with the envelope's message when there is one."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    else:
        message = f"HTTP {response.status_code}: {str(body)[:200] if body else 'no body'}"
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response, body=body)
