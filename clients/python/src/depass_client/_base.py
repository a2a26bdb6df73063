"""What :class:`Client` and :class:`AsyncClient` share: configuration, request bodies,
the retry policy and response parsing. The two I/O classes only send and sleep.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np

from depass_client import _arrays
from depass_client._errors import APIConnectionError, APITimeoutError
from depass_client._types import Attribution, Generation

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({408, 429})
#: The media type of a binary (safetensors) response.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"


class BaseClient:
    """Configuration and policy of a DePass Serve client.

    Args:
        base_url: the service; falls back to ``DEPASS_BASE_URL``, then
            ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; falls back to ``DEPASS_API_KEY``.
        timeout: seconds (or an :class:`httpx.Timeout`) per attempt.
        max_retries: retries of connection errors, timeouts, 408, 429 and 5xx answers.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = (base_url or os.environ.get("DEPASS_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.api_key = api_key if api_key is not None else os.environ.get("DEPASS_API_KEY") or None
        self.timeout = timeout
        self.max_retries = max_retries
        self.default_headers = dict(default_headers or {})

    # ------------------------------------------------------------------ requests

    def _headers(self, binary: bool = False) -> dict[str, str]:
        headers = {"Accept": SAFETENSORS_MEDIA_TYPE if binary else "application/json"}
        headers["User-Agent"] = "depass-client/0.1.0"
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
    def _attribution_body(fields: dict[str, Any]) -> dict[str, Any]:
        """The JSON body of an attribution: numpy ``subspace`` encoded, arrays decodable."""
        body = dict(fields)
        body.setdefault("array_encoding", _arrays.default_encoding())
        subspace = body.get("subspace")
        if subspace is not None and not isinstance(subspace, dict):
            body["subspace"] = _arrays.encode(np.asarray(subspace))
        return body

    @staticmethod
    def _generate_body(fields: dict[str, Any]) -> dict[str, Any]:
        body = dict(fields)
        body.setdefault("array_encoding", _arrays.default_encoding())
        return body

    # ------------------------------------------------------------------ retries

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None to give up.

        ``Retry-After`` (seconds or an HTTP date, or ``retry-after-ms``) is honoured up to
        a minute; otherwise capped exponential backoff with jitter.
        """
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if not (response.status_code in RETRY_STATUSES or response.status_code >= 500):
                return None
            hinted = _retry_after_s(response.headers)
            if hinted is not None and 0 <= hinted <= MAX_RETRY_AFTER_S:
                return hinted
        delay = min(INITIAL_RETRY_DELAY_S * 2.0**attempt, MAX_RETRY_DELAY_S)
        return delay * (1 - 0.25 * random.random())

    @staticmethod
    def _connection_error(request: httpx.Request, exc: Exception) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(request)
        return APIConnectionError(request, f"connection error: {exc}")

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


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """The server's ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    return None if parsed is None else max(0.0, parsed.timestamp() - time.time())
