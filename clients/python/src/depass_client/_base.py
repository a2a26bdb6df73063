"""What :class:`Client` and :class:`AsyncClient` share: configuration, request bodies,
the retry policy, errors and response parsing. The two I/O classes only send and sleep.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import numpy as np

from depass_client import _arrays
from depass_client._errors import APIConnectionError, APITimeoutError, status_error
from depass_client._retry import RetryPolicy
from depass_client._types import Attribution, Generation

try:  # the one version, from clients/python/pyproject.toml
    __version__ = importlib.metadata.version("depass-client")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0+unknown"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
#: The media type of a binary (safetensors) response.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"


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
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
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

    def _headers(self, binary: bool = False) -> dict[str, str]:
        headers = {"Accept": SAFETENSORS_MEDIA_TYPE if binary else "application/json"}
        headers["User-Agent"] = f"depass-client/{__version__}"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.default_headers)
        return headers

    def _build_request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        body: Any = None,
        binary: bool = False,
    ) -> httpx.Request:
        return http.build_request(
            method,
            f"{self.base_url}{path}",
            json=body,
            headers=self._headers(binary),
            timeout=self.timeout,
        )

    @staticmethod
    def _body(prompt: str | None, fields: dict[str, Any]) -> dict[str, Any]:
        """The JSON body of an attribution or generation: the prompt (or ``input_ids`` /
        ``messages`` among the fields), a numpy ``subspace`` encoded, arrays decodable."""
        body = dict(fields)
        if prompt is not None:
            body["prompt"] = prompt
        body.setdefault("array_encoding", _arrays.default_encoding())
        subspace = body.get("subspace")
        if subspace is not None and not isinstance(subspace, dict):
            body["subspace"] = _arrays.encode(np.asarray(subspace))
        return body

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
    def _many(requests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
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

    # ------------------------------------------------------------------ responses

    @staticmethod
    def _parse_attribution(response: httpx.Response) -> Attribution:
        if _is_binary(response):
            return Attribution.from_safetensors_bytes(response.content)
        return Attribution.from_json(response.json())

    @staticmethod
    def _parse_generation(response: httpx.Response) -> Generation:
        if _is_binary(response):
            return Generation.from_safetensors_bytes(response.content)
        return Generation.from_json(response.json())


def _is_binary(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith(SAFETENSORS_MEDIA_TYPE)
