"""The routes' shared base: the routers every endpoint hangs its routes on, the error
responses they declare, and JSON routes.

:func:`v1_router` and :func:`ops_router` give an endpoint's ``api_router.py`` its router:
``/v1/*`` routes need the API key when one is configured and take JSON bodies;
``/health``, ``/ready`` and ``/metrics`` stay open (``/metrics`` needs the key with
``DEPASS_PROTECT_METRICS``). Every status a route can answer is declared with its model
(:func:`error_responses`), so that the OpenAPI document is the contract the fuzz tests hold
the service to.

JSON routes: the body must be declared JSON (415) and be strict JSON (400).

FastAPI's own parsing accepts any byte encoding ``json.loads`` can guess, any nesting its
recursion allows, and strings holding lone UTF-16 surrogates (``"\\ud800"``), which no
tokenizer can encode and no response can echo. :class:`JSONRoute` checks the media type
before the body is read, and parses the body itself:

* UTF-8 only (RFC 8259 section 8.1);
* at most :data:`MAX_JSON_DEPTH` nested arrays and objects (the deepest valid body, a
  list-encoded array, nests 5);
* no lone surrogates in strings or keys.

``NaN`` and ``Infinity`` literals still parse, so that the field holding one gets the
usual 422 naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from service.dependencies import bearer_scheme
from service.errors import InvalidJSONError, UnsupportedMediaTypeError
from service.protocol import SAFETENSORS_MEDIA_TYPE, ErrorResponse

MAX_JSON_DEPTH = 32
#: A ``\\uD800``-``\\uDFFF`` escape: the only way a lone surrogate gets into valid UTF-8 JSON.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, with any parameters."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def parse_json(body: bytes) -> Any:
    """The value of a JSON body, held to the rules of this module.

    Raises:
        InvalidJSONError: not UTF-8, nested too deeply, a number of thousands of digits, or
            a lone surrogate.
        json.JSONDecodeError: a syntax error (FastAPI turns it into its own 400).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSONError(f"it is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InvalidJSONError(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise InvalidJSONError("a number has too many digits") from None
    _check_structure(value, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _check_structure(value: Any, strings: bool) -> None:
    """Walk the parsed value (no recursion): depth, and, when ``strings``, surrogates."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidJSONError(f"it nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            if strings:
                for key in node:
                    _check_text(key)
            children: Any = node.values()
        else:
            children = node
        for child in children:
            if isinstance(child, (dict, list)) or (strings and isinstance(child, str)):
                stack.append((child, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJSONError(
            f"a string holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x})"
        ) from None


class JSONRequest(Request):
    """A request whose :meth:`json` is :func:`parse_json` of the body."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose body, if it takes one, must be ``application/json`` (else 415)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def json_route_handler(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if not is_json_media_type(content_type):
                shown = f"'{content_type}'" if content_type else "none"
                raise UnsupportedMediaTypeError(
                    f"this route takes a JSON body: send 'Content-Type: application/json' "
                    f"(got {shown[:100]})"
                )
            return await handler(JSONRequest(request.scope, request.receive))

        return json_route_handler


# ---------------------------------------------------------------------------- routers

#: What each error status means, as the OpenAPI document describes it.
ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON (syntax, not UTF-8, nested too deeply).",
    401: "A key is configured and the bearer token is missing or wrong.",
    413: "The input, the body or the estimated response is over a limit.",
    415: "The body is not declared as `Content-Type: application/json`.",
    422: "A field is invalid (for the API or for the loaded model); `param` names it.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    503: "The model is not loaded, or it ran out of memory on this request.",
    504: "The request passed DEPASS_REQUEST_TIMEOUT_S.",
}
#: What every route with a JSON body may answer besides 200.
BODY_ERRORS = (400, 413, 415)
#: A route that runs on the worker may also find the queue full or pass its deadline.
WORKER_ERRORS = (429, 504)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that may answer these error statuses (the envelope)."""
    return {
        code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes
    }


#: The 200 of a route whose arrays may travel as a safetensors file.
BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON with encoded arrays; a safetensors file when `Accept` asks for "
        f"`{SAFETENSORS_MEDIA_TYPE}` (the JSON fields in its metadata under 'depass').",
    }
}


def v1_router() -> APIRouter:
    """A router of ``/v1/*`` routes: API key, JSON bodies, the ``v1`` tag, and the errors
    any of them may answer (401, 422, 503)."""
    return APIRouter(
        prefix="/v1",
        dependencies=[Depends(bearer_scheme)],
        responses=error_responses(401, 422, 503),
        tags=["v1"],
        route_class=JSONRoute,
    )


def ops_router() -> APIRouter:
    """A router of the open operations routes (``ops`` tag)."""
    return APIRouter(tags=["ops"])
