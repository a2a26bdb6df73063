"""The SDK's retry policy: which failures to send again, and how long to wait first.

No I/O of its own: :class:`depass_client.Client` and :class:`depass_client.AsyncClient`
both ask it after each failed attempt. Only what a retry can fix is retried:

* connection failures before the service got the request (refused, reset, DNS, a connect
  or pool timeout; not a read timeout, where the service is still working on it);
* 429 (the queue is full), 502 (a proxy found no replica) and 503 (the model is loading);
* anything the service marks ``x-should-retry: true``.

The service marks ``x-should-retry: false`` where the same request would redo the same
work and fail again (504, its own deadline; 503 out of memory): those are never retried,
nor are other 4xx and 5xx answers.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

#: The service's hint: whether this very request may succeed if sent again.
SHOULD_RETRY_HEADER = "x-should-retry"
#: Statuses retried when the service gives no hint.
RETRY_STATUSES = frozenset({429, 502, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry, and the capped exponential backoff (with jitter) between attempts.

    A ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms`` of up to
    ``max_retry_after_s`` is honoured instead of the backoff.
    """

    max_retries: int = 2
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def should_retry(
        self, response: httpx.Response | None = None, error: Exception | None = None
    ) -> bool:
        """Whether a failed attempt (a response, or a transport error) is worth repeating."""
        if response is None:
            return isinstance(error, httpx.TransportError) and _before_the_service(error)
        hint = response.headers.get(SHOULD_RETRY_HEADER, "").strip().lower()
        if hint in ("true", "false"):
            return hint == "true"
        return response.status_code in RETRY_STATUSES

    def delay(
        self,
        attempt: int,
        response: httpx.Response | None = None,
        error: Exception | None = None,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (0-based), or None to give up."""
        if attempt >= self.max_retries or not self.should_retry(response, error):
            return None
        if response is not None:
            hinted = retry_after_s(response.headers)
            if hinted is not None and 0 <= hinted <= self.max_retry_after_s:
                return hinted
        backoff = min(self.initial_delay_s * 2.0**attempt, self.max_delay_s)
        return backoff * (1 - 0.25 * random.random())


def _before_the_service(error: httpx.TransportError) -> bool:
    """A transport error after which the service has not (or no longer) worked on the
    request: every one but a read or write timeout, where it may still be running."""
    if isinstance(error, httpx.TimeoutException):
        return isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout))
    return True


def retry_after_s(headers: httpx.Headers) -> float | None:
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
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - time.time())
