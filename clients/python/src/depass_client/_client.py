"""The synchronous :class:`Client` and the asynchronous :class:`AsyncClient`.

Both have the same methods with the same parameters (a test holds them equal); everything
but sending and sleeping (routes, bodies, per-call options, the retry policy, errors, the
readiness wait, parsing) lives in :class:`depass_client._base.BaseClient`. The request
fields are typed keyword arguments declared once, in :mod:`depass_client._params`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

import httpx

from depass_client._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    NOT_GIVEN,
    BaseClient,
    Call,
    NotGiven,
    ResultT,
    Timeout,
)
from depass_client._errors import DePassError
from depass_client._progress import ProgressBar
from depass_client._types import Attribution, Generation, ModelCard, NextTokens, Tokenization

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

    from depass_client._params import (
        AttributionFields,
        AttributionParams,
        GenerationFields,
        NextTokensFields,
    )


class Client(BaseClient):
    """A synchronous client of DePass Serve.

    Args:
        base_url: the service; falls back to ``DEPASS_BASE_URL``, then
            ``http://127.0.0.1:8000``.
        api_key: falls back to ``DEPASS_API_KEY``.
        timeout: seconds (or an :class:`httpx.Timeout`) per attempt.
        max_retries: retries of what a retry can fix (connection failures, 429, 502,
            503 not ready), with capped exponential backoff that honours ``Retry-After``;
            a 504 or an out-of-memory 503 is never retried.
        default_headers: sent with every request.
        http_client: an :class:`httpx.Client` to send with (custom transports, proxies).

    Every method also takes ``timeout`` (this call's, over the client's) and
    ``extra_headers`` (added over the client's headers).

    Example:
        >>> with Client() as client:  # doctest: +SKIP
        ...     result = client.attribute(prompt="The capital of France is", positions=[-1])
        ...     print(result.table())
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    # ------------------------------------------------------------------ API

    def attribute(
        self,
        prompt: str | None = None,
        *,
        binary: bool = False,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[AttributionFields],
    ) -> Attribution:
        """``POST /v1/attributions``: decompose a prompt and score its components.

        Args:
            prompt: the text (or pass ``input_ids=[...]``, or ``messages=[{"role": "user",
                "content": ...}]`` for a chat in the model's template).
            binary: receive the arrays as a safetensors body rather than JSON.
            timeout: this call's timeout per attempt (default: the client's).
            extra_headers: headers sent with this call, over the client's.
            **fields: the request's other fields (:class:`AttributionFields`:
                ``granularity``, ``start_layer``, ``positions``, ``targets``, ``outputs``,
                ``subspace`` as a numpy array, ``array_dtype``, ...); see docs/api.md.
                ``None`` or left out: the service's default.
        """
        return self._send(self._attribute_call(prompt, fields, binary, timeout, extra_headers))

    def generate(
        self,
        prompt: str | None = None,
        *,
        binary: bool = False,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[GenerationFields],
    ) -> Generation:
        """``POST /v1/generate``: continue a prompt (or ``messages``) and attribute each
        generated token (``fields``: :class:`GenerationFields`)."""
        return self._send(self._generate_call(prompt, fields, binary, timeout, extra_headers))

    def next_tokens(
        self,
        prompt: str | None = None,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[NextTokensFields],
    ) -> NextTokens:
        """``POST /v1/next_tokens``: the model's most likely next tokens after some
        ``positions`` (default the last), ``top_k`` of them (default 5), from one forward
        pass; a candidate's ``id`` is a ready attribution target."""
        return self._send(self._next_tokens_call(prompt, fields, timeout, extra_headers))

    def tokenize(
        self,
        prompt: str,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Tokenization:
        """``POST /v1/tokenize``: token ids and texts as the model sees them."""
        return self._send(self._tokenize_call(prompt, timeout, extra_headers))

    def model(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ModelCard:
        """``GET /v1/model``: the loaded model and the limits in force."""
        return self._send(self._model_call(timeout, extra_headers))

    def health(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``GET /health``: liveness."""
        return self._send(self._health_call(timeout, extra_headers))

    def metrics(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """``GET /metrics``: the service's Prometheus metrics, as text."""
        return self._send(self._metrics_call(timeout, extra_headers))

    def ready(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> bool:
        """``GET /ready`` once, without retries: whether the model is loaded."""
        call = self._ready_call(timeout, extra_headers)
        try:
            return call.parse(self._http.send(self._build_request(self._http, call)))
        except httpx.TransportError:
            return False

    def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        """Poll ``/ready`` every ``interval_s`` until the model is loaded.

        Raises:
            DePassError: not ready within ``timeout_s``.
        """
        wait = self._ready_wait(timeout_s, interval_s)
        while not self.ready():
            self._sleep(wait.pause())

    def attribute_many(
        self,
        requests: Iterable[AttributionParams],
        concurrency: int = 4,
        progress: bool = True,
        return_exceptions: bool = False,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Run many attributions, ``concurrency`` at a time, in input order.

        Head requests on one prompt that differ only in ``start_layer`` get a warning:
        one request with a list of layers does the same in one call.

        Args:
            requests: the fields of one :meth:`attribute` call each, ``prompt`` included.
            progress: draw a progress bar on stderr.
            return_exceptions: put a failed request's :class:`DePassError` in its slot
                instead of raising the first one.
            timeout, extra_headers: as for :meth:`attribute`, for every request.
        """
        items = self._many(requests)
        results: list[Any] = [None] * len(items)
        bar = ProgressBar(len(items), enabled=progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                futures = {
                    pool.submit(
                        self.attribute, timeout=timeout, extra_headers=extra_headers, **item
                    ): i
                    for i, item in enumerate(items)
                }
                for future in as_completed(futures):
                    index = futures[future]
                    try:
                        results[index] = future.result()
                    except DePassError as exc:
                        if not return_exceptions:
                            for other in futures:
                                other.cancel()
                            raise
                        results[index] = exc
                    bar.update()
        finally:
            bar.close()
        return results

    # ------------------------------------------------------------------ plumbing

    def _send(self, call: Call[ResultT]) -> ResultT:
        """Send, retrying as the policy says; the parsed answer or the SDK's error."""
        attempt = 0
        while True:
            request = self._build_request(self._http, call)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._retry_delay(attempt, request, error=exc)
            else:
                if response.is_success:
                    return call.parse(response)
                delay = self._retry_delay(attempt, request, response=response)
                response.close()
            self._sleep(delay)
            attempt += 1

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        """Close the connection pool (when this client made it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(BaseClient):
    """An asyncio client of DePass Serve, with the methods of :class:`Client`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def attribute(
        self,
        prompt: str | None = None,
        *,
        binary: bool = False,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[AttributionFields],
    ) -> Attribution:
        """See :meth:`Client.attribute`."""
        call = self._attribute_call(prompt, fields, binary, timeout, extra_headers)
        return await self._send(call)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        binary: bool = False,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[GenerationFields],
    ) -> Generation:
        """See :meth:`Client.generate`."""
        call = self._generate_call(prompt, fields, binary, timeout, extra_headers)
        return await self._send(call)

    async def next_tokens(
        self,
        prompt: str | None = None,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        **fields: Unpack[NextTokensFields],
    ) -> NextTokens:
        """See :meth:`Client.next_tokens`."""
        return await self._send(self._next_tokens_call(prompt, fields, timeout, extra_headers))

    async def tokenize(
        self,
        prompt: str,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Tokenization:
        """See :meth:`Client.tokenize`."""
        return await self._send(self._tokenize_call(prompt, timeout, extra_headers))

    async def model(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ModelCard:
        """See :meth:`Client.model`."""
        return await self._send(self._model_call(timeout, extra_headers))

    async def health(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """See :meth:`Client.health`."""
        return await self._send(self._health_call(timeout, extra_headers))

    async def metrics(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """See :meth:`Client.metrics`."""
        return await self._send(self._metrics_call(timeout, extra_headers))

    async def ready(
        self,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> bool:
        """See :meth:`Client.ready`."""
        call = self._ready_call(timeout, extra_headers)
        try:
            return call.parse(await self._http.send(self._build_request(self._http, call)))
        except httpx.TransportError:
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        """See :meth:`Client.wait_until_ready`."""
        wait = self._ready_wait(timeout_s, interval_s)
        while not await self.ready():
            await self._sleep(wait.pause())

    async def attribute_many(
        self,
        requests: Iterable[AttributionParams],
        concurrency: int = 4,
        progress: bool = True,
        return_exceptions: bool = False,
        *,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """See :meth:`Client.attribute_many`."""
        items = self._many(requests)
        gate = asyncio.Semaphore(max(1, concurrency))
        bar = ProgressBar(len(items), enabled=progress)

        async def one(item: dict[str, Any]) -> Any:
            async with gate:
                try:
                    return await self.attribute(
                        timeout=timeout, extra_headers=extra_headers, **item
                    )
                except DePassError as exc:
                    if not return_exceptions:
                        raise
                    return exc
                finally:
                    bar.update()

        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            bar.close()

    async def _send(self, call: Call[ResultT]) -> ResultT:
        """See :meth:`Client._send`."""
        attempt = 0
        while True:
            request = self._build_request(self._http, call)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._retry_delay(attempt, request, error=exc)
            else:
                if response.is_success:
                    return call.parse(response)
                delay = self._retry_delay(attempt, request, response=response)
                await response.aclose()
            await self._sleep(delay)
            attempt += 1

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        """Close the connection pool (when this client made it)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def __aenter__(self) -> AsyncClient:
        return self
