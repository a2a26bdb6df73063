"""What :class:`Client` and :class:`AsyncClient` share: configuration, the routes,
request bodies and per-call options, the retry policy, errors, the readiness wait and
response parsing. The two I/O classes only send and sleep.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar

import httpx
import numpy as np

from depass_client import _arrays
from depass_client._errors import APIConnectionError, APITimeoutError, DePassError, status_error
from depass_client._params import AttributionParams
from depass_client._retry import RetryPolicy
from depass_client._types import Attribution, Generation, ModelCard, NextTokens, Tokenization

try:  # the one version, from clients/python/pyproject.toml
    __version__ = importlib.metadata.version("depass-client")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0+unknown"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
#: The media type of a binary (safetensors) response.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
#: A timeout: seconds, an :class:`httpx.Timeout`, or None for none at all.
Timeout: TypeAlias = float | httpx.Timeout | None


class NotGiven:
    """The default of a per-call option: the client's own setting (``None`` is a value:
    ``timeout=None`` waits forever)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()


class Route(NamedTuple):
    """One operation of the service's HTTP API."""

    method: str
    path: str
    accept: str = "application/json"


#: Every operation of the service, by the name of the method that calls it in both
#: clients (a contract test holds this equal to the service's OpenAPI document).
ROUTES: dict[str, Route] = {
    "attribute": Route("POST", "/v1/attributions"),
    "generate": Route("POST", "/v1/generate"),
    "tokenize": Route("POST", "/v1/tokenize"),
    "next_tokens": Route("POST", "/v1/next_tokens"),
    "model": Route("GET", "/v1/model"),
    "health": Route("GET", "/health"),
    "ready": Route("GET", "/ready"),
    "metrics": Route("GET", "/metrics", accept="text/plain"),
}

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Call(Generic[ResultT]):
    """One call of an operation: what to send, with this call's options, and how to read
    a successful answer. Built by :class:`BaseClient`, sent by either client."""

    route: Route
    parse: Callable[[httpx.Response], ResultT]
    body: Any = None
    binary: bool = False
    timeout: Timeout | NotGiven = NOT_GIVEN
    extra_headers: Mapping[str, str] | None = None


class BaseClient:
    """Configuration and policy of a DePass Serve client.

    Args:
        base_url: the service; falls back to ``DEPASS_BASE_URL``, then
            ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; falls back to ``DEPASS_API_KEY``.
        timeout: seconds (or an :class:`httpx.Timeout`) per attempt.
        max_retries: retries of what a retry can fix (see :mod:`depass_client._retry`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.base_url = (base_url or os.environ.get("DEPASS_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.api_key = api_key if api_key is not None else os.environ.get("DEPASS_API_KEY") or None
        self.timeout = timeout
        self.default_headers = dict(default_headers or {})

    @property
    def max_retries(self) -> int:
        """Retries after the first attempt."""
        return self.retry_policy.max_retries

    # ------------------------------------------------------------------ requests

    def _headers(
        self, accept: str, extra_headers: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The client's headers, then its ``default_headers``, then the call's own."""
        headers = {"Accept": accept, "User-Agent": f"depass-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.default_headers)
        headers.update(extra_headers or {})
        return headers

    def _build_request(
        self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]
    ) -> httpx.Request:
        """One attempt's request; the call's ``timeout`` and ``extra_headers`` win over
        the client's."""
        accept = SAFETENSORS_MEDIA_TYPE if call.binary else call.route.accept
        timeout = self.timeout if isinstance(call.timeout, NotGiven) else call.timeout
        return http.build_request(
            call.route.method,
            f"{self.base_url}{call.route.path}",
            json=call.body,
            headers=self._headers(accept, call.extra_headers),
            timeout=timeout,
        )

    @staticmethod
    def _body(prompt: str | None, fields: Mapping[str, Any], arrays: bool = True) -> dict[str, Any]:
        """The JSON body of a request: the given fields (``None`` left out: the service's
        default), the prompt, a numpy ``subspace`` encoded and, for responses with
        arrays, an ``array_encoding`` this environment can decode."""
        body = {k: v for k, v in fields.items() if v is not None}
        if prompt is not None:
            body["prompt"] = prompt
        if arrays:
            body.setdefault("array_encoding", _arrays.default_encoding())
        subspace = body.get("subspace")
        if subspace is not None and not isinstance(subspace, dict):
            body["subspace"] = _arrays.encode(np.asarray(subspace))
        return body

    def _ready_wait(self, timeout_s: float, interval_s: float) -> ReadyWait:
        """The pauses of ``wait_until_ready``, from now."""
        return ReadyWait(self.base_url, timeout_s, interval_s)

    # ------------------------------------------------------------------ operations
    # What each method of both clients sends, and how it reads the answer.

    def _attribute_call(
        self,
        prompt: str | None,
        fields: Mapping[str, Any],
        binary: bool,
        timeout: Timeout | NotGiven,
        extra_headers: Mapping[str, str] | None,
    ) -> Call[Attribution]:
        body = self._body(prompt, fields)
        return Call(ROUTES["attribute"], _attribution, body, binary, timeout, extra_headers)

    def _generate_call(
        self,
        prompt: str | None,
        fields: Mapping[str, Any],
        binary: bool,
        timeout: Timeout | NotGiven,
        extra_headers: Mapping[str, str] | None,
    ) -> Call[Generation]:
        body = self._body(prompt, fields)
        return Call(ROUTES["generate"], _generation, body, binary, timeout, extra_headers)

    def _next_tokens_call(
        self,
        prompt: str | None,
        fields: Mapping[str, Any],
        timeout: Timeout | NotGiven,
        extra_headers: Mapping[str, str] | None,
    ) -> Call[NextTokens]:
        body = self._body(prompt, fields, arrays=False)
        return Call(ROUTES["next_tokens"], _next_tokens, body, False, timeout, extra_headers)

    @staticmethod
    def _tokenize_call(
        prompt: str, timeout: Timeout | NotGiven, extra_headers: Mapping[str, str] | None
    ) -> Call[Tokenization]:
        body = {"prompt": prompt}
        return Call(ROUTES["tokenize"], _tokenization, body, False, timeout, extra_headers)

    @staticmethod
    def _model_call(
        timeout: Timeout | NotGiven, extra_headers: Mapping[str, str] | None
    ) -> Call[ModelCard]:
        return Call(ROUTES["model"], _model_card, timeout=timeout, extra_headers=extra_headers)

    @staticmethod
    def _health_call(
        timeout: Timeout | NotGiven, extra_headers: Mapping[str, str] | None
    ) -> Call[dict[str, Any]]:
        return Call(ROUTES["health"], _json_object, timeout=timeout, extra_headers=extra_headers)

    @staticmethod
    def _metrics_call(
        timeout: Timeout | NotGiven, extra_headers: Mapping[str, str] | None
    ) -> Call[str]:
        return Call(ROUTES["metrics"], _text, timeout=timeout, extra_headers=extra_headers)

    @staticmethod
    def _ready_call(
        timeout: Timeout | NotGiven, extra_headers: Mapping[str, str] | None
    ) -> Call[bool]:
        """One probe, sent once: any answer but 200 (or none) is "not ready"."""
        return Call(ROUTES["ready"], _is_ok, timeout=timeout, extra_headers=extra_headers)

    # ------------------------------------------------------------------ failures

    def _retry_delay(
        self,
        attempt: int,
        request: httpx.Request,
        response: httpx.Response | None = None,
        error: Exception | None = None,
    ) -> float:
        """Seconds to wait before retrying a failed attempt; raises the SDK's error when
        the policy gives up (the response is read for its message)."""
        delay = self.retry_policy.delay(attempt, response, error)
        if delay is not None:
            return delay
        if response is not None:
            raise status_error(response)
        assert error is not None
        raise self._connection_error(request, error) from error

    @staticmethod
    def _connection_error(request: httpx.Request, exc: Exception) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(request, f"{exc.__class__.__name__}: {exc}")
        return APIConnectionError(request, f"could not reach {request.url}: {exc}")

    # ------------------------------------------------------------------ many requests

    @staticmethod
    def _many(requests: Iterable[AttributionParams]) -> list[dict[str, Any]]:
        """The requests of ``attribute_many``, after a hint when several head requests on
        one prompt differ only in their layer: one request with a list of layers shares
        the work (one forward pass held for all, one planning, one response)."""
        items = [dict(r) for r in requests]
        layers: dict[str, list[int]] = defaultdict(list)
        for item in items:
            layer = item.get("start_layer", 0)
            if item.get("granularity") == "head" and isinstance(layer, int):
                rest = {k: v for k, v in item.items() if k != "start_layer"}
                layers[json.dumps(rest, sort_keys=True, default=str)].append(layer)
        shared = max(layers.values(), key=len, default=[])
        if len(shared) > 1:
            warnings.warn(
                f"{len(shared)} head requests on one prompt differ only in start_layer, so "
                "they cannot share a batch (each layer starts at another stage); send one "
                f"request with start_layer={sorted(set(shared))} instead: one engine call on "
                "one forward pass, one response with a layer axis and each layer's labels "
                "(Attribution.labels(layer))",
                UserWarning,
                stacklevel=3,
            )
        return items


def _attribution(response: httpx.Response) -> Attribution:
    if _is_binary(response):
        return Attribution.from_safetensors_bytes(response.content)
    return Attribution.from_json(response.json())


def _generation(response: httpx.Response) -> Generation:
    if _is_binary(response):
        return Generation.from_safetensors_bytes(response.content)
    return Generation.from_json(response.json())


def _next_tokens(response: httpx.Response) -> NextTokens:
    return NextTokens.from_json(response.json())


def _tokenization(response: httpx.Response) -> Tokenization:
    return Tokenization.from_json(response.json())


def _model_card(response: httpx.Response) -> ModelCard:
    return ModelCard.from_json(response.json())


def _json_object(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    return body


def _text(response: httpx.Response) -> str:
    return response.text


def _is_ok(response: httpx.Response) -> bool:
    return response.status_code == 200


class ReadyWait:
    """``wait_until_ready``'s schedule: the pause before the next poll of ``/ready``, or
    a :class:`DePassError` once ``timeout_s`` have passed since it was made."""

    def __init__(self, base_url: str, timeout_s: float, interval_s: float) -> None:
        self.message = f"{base_url} was not ready within {timeout_s:g} s"
        self.deadline = time.monotonic() + timeout_s
        self.interval_s = interval_s

    def pause(self) -> float:
        """Seconds to wait before polling again.

        Raises:
            DePassError: the time is up.
        """
        if time.monotonic() >= self.deadline:
            raise DePassError(self.message)
        return self.interval_s


def _is_binary(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith(SAFETENSORS_MEDIA_TYPE)
