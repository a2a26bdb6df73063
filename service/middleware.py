"""ASGI middleware that acts before any route reads the body: metrics, API key, body limit.

Order, outermost first (see :func:`service.app.create_app`):

1. :class:`MetricsMiddleware` counts and times every request, refused ones included.
2. :class:`ApiKeyMiddleware` answers 401 without reading the body.
3. :class:`BodyLimitMiddleware` answers 413 from ``Content-Length``, or while the body
   streams in, before any JSON parsing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    AuthenticationError,
    BodyTooLargeError,
    error_response,
    from_http_exception,
)
from service.metrics import Metrics


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


# ---------------------------------------------------------------------------- API key


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: bytes | None, key: bytes) -> bool:
    """Constant-time comparison; the digests hide the key's length too."""
    if token is None:
        return False
    return hmac.compare_digest(hashlib.sha256(token).digest(), hashlib.sha256(key).digest())


class ApiKeyMiddleware:
    """401 with ``WWW-Authenticate: Bearer`` for a protected path without the right key.

    Args:
        api_key: the configured key; None lets everything through.
        protected: whether a path needs the key.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, protected: Callable[[str], bool]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        if key_matches(token, self.key):
            await self.app(scope, receive, send)
            return
        message = (
            "the API key is not valid"
            if token is not None
            else "this service requires an API key: send the header 'Authorization: Bearer <key>'"
        )
        await error_response(AuthenticationError(message))(scope, receive, send)


# ---------------------------------------------------------------------------- body limit


class BodyLimitMiddleware:
    """413 for request bodies over ``max_body_bytes``, before any parsing.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is
    counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(from_http_exception(BodyTooLargeError(limit)))
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------- metrics


class RouteNames:
    """The route template a path was sent to (``/v1/attributions``, ``/ui``), known
    before routing runs: a request answered before routing (a 401, a body over the
    limit) is counted under its route too. The templates are the API's (the OpenAPI
    document's paths) and the app's own routes and mounts (``/openapi.json``, ``/ui``);
    read once, at the first request, when every route is in place."""

    def __init__(self) -> None:
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, scope: Scope) -> str:
        if self._patterns is None:
            self._patterns = _route_patterns(scope["app"])
        path = scope["path"]
        return next((name for pattern, name in self._patterns if pattern.match(path)), "unmatched")


def _route_patterns(app: Any) -> list[tuple[re.Pattern[str], str]]:
    templates = list(app.openapi().get("paths", {}))
    mounts = []
    for route in app.routes:
        if isinstance(route, Mount):
            mounts.append(route.path)
        elif isinstance(getattr(route, "path", None), str):
            templates.append(route.path)
    patterns = [(compile_path(t)[0], t) for t in dict.fromkeys(templates)]
    patterns += [(re.compile(re.escape(m) + "(/.*)?$"), m) for m in mounts]
    return patterns


class MetricsMiddleware:
    """Counts every HTTP request by route, granularity and status, and times it.

    A request is counted under the route it was sent to, also when it was answered
    before routing (a 401, a declared body over the limit) or by a mount or a plain
    route (``/ui``, ``/openapi.json``); only a path no route matches is ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.route_name = RouteNames()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = time.perf_counter()
        status = 500
        path = self.route_name(scope)  # before routing rewrites the scope (mounts)

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            granularity = str(scope.get("state", {}).get("granularity", ""))
            self.metrics.requests.labels(path, scope["method"], granularity, str(status)).inc()
            self.metrics.request_duration.labels(path).observe(time.perf_counter() - clock)
