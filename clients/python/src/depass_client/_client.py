"""The synchronous :class:`Client` and the asynchronous :class:`AsyncClient`.

Both have the same methods; everything but sending and sleeping (bodies, the retry
policy, errors, parsing) lives in :class:`depass_client._base.BaseClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx

from depass_client._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient
from depass_client._errors import DePassError
from depass_client._progress import ProgressBar
from depass_client._types import Attribution, Generation, ModelCard, Tokenization


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
        http_client: an :class:`httpx.Client` to send with (custom transports, proxies).

    Example:
        >>> with Client() as client:  # doctest: +SKIP
        ...     result = client.attribute(prompt="The capital of France is", positions=[-1])
        ...     print(result.table())
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    # ------------------------------------------------------------------ API

    def attribute(
        self, prompt: str | None = None, *, binary: bool = False, **fields: Any
    ) -> Attribution:
        """``POST /v1/attributions``: decompose a prompt and score its components.

        Args:
            prompt: the text (or pass ``input_ids=[...]``, or ``messages=[{"role": "user",
                "content": ...}]`` for a chat in the model's template).
            binary: receive the arrays as a safetensors body rather than JSON.
            **fields: the request's other fields (``granularity``, ``start_layer``,
                ``positions``, ``targets``, ``outputs``, ``subspace`` as a numpy array,
                ``array_dtype``, ...); see docs/api.md.
        """
        body = self._body(prompt, fields)
        return self._parse_attribution(self._request("POST", "/v1/attributions", body, binary))

    def generate(
        self, prompt: str | None = None, *, binary: bool = False, **fields: Any
    ) -> Generation:
        """``POST /v1/generate``: continue a prompt (or ``messages``) and attribute each
        generated token."""
        body = self._body(prompt, fields)
        return self._parse_generation(self._request("POST", "/v1/generate", body, binary))

    def tokenize(self, prompt: str) -> Tokenization:
        """``POST /v1/tokenize``: token ids and texts as the model sees them."""
        response = self._request("POST", "/v1/tokenize", {"prompt": prompt})
        return Tokenization.from_json(response.json())

    def model(self) -> ModelCard:
        """``GET /v1/model``: the loaded model and the limits in force."""
        return ModelCard.from_json(self._request("GET", "/v1/model").json())

    def health(self) -> dict[str, Any]:
        """``GET /health``: liveness."""
        body: dict[str, Any] = self._request("GET", "/health").json()
        return body

    def ready(self) -> bool:
        """``GET /ready`` once, without retries: whether the model is loaded."""
        request = self._build_request(self._http, "GET", "/ready")
        try:
            return self._http.send(request).status_code == 200
        except httpx.TransportError:
            return False

    def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        """Poll ``/ready`` until the model is loaded.

        Raises:
            DePassError: not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() >= deadline:
                raise DePassError(f"{self.base_url} was not ready within {timeout_s:g} s")
            time.sleep(interval_s)

    def attribute_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        concurrency: int = 4,
        progress: bool = True,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run many attributions, ``concurrency`` at a time, in input order.

        Head requests on one prompt that differ only in ``start_layer`` get a warning:
        one request with a list of layers does the same in one call.

        Args:
            requests: one dict of :meth:`attribute` fields each.
            progress: draw a progress bar on stderr.
            return_exceptions: put a failed request's :class:`DePassError` in its slot
                instead of raising the first one.
        """
        items = self._many(requests)
        results: list[Any] = [None] * len(items)
        bar = ProgressBar(len(items), enabled=progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                futures = {pool.submit(self.attribute, **item): i for i, item in enumerate(items)}
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

    def _request(
        self, method: str, path: str, body: Any = None, binary: bool = False
    ) -> httpx.Response:
        """Send, retrying as the policy says; a successful response or the SDK's error."""
        attempt = 0
        while True:
            request = self._build_request(self._http, method, path, body, binary)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._retry_delay(attempt, request, error=exc)
            else:
                if response.is_success:
                    return response
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
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def attribute(
        self, prompt: str | None = None, *, binary: bool = False, **fields: Any
    ) -> Attribution:
        """See :meth:`Client.attribute`."""
        body = self._body(prompt, fields)
        response = await self._request("POST", "/v1/attributions", body, binary)
        return self._parse_attribution(response)

    async def generate(
        self, prompt: str | None = None, *, binary: bool = False, **fields: Any
    ) -> Generation:
        """See :meth:`Client.generate`."""
        body = self._body(prompt, fields)
        return self._parse_generation(await self._request("POST", "/v1/generate", body, binary))

    async def tokenize(self, prompt: str) -> Tokenization:
        """See :meth:`Client.tokenize`."""
        response = await self._request("POST", "/v1/tokenize", {"prompt": prompt})
        return Tokenization.from_json(response.json())

    async def model(self) -> ModelCard:
        """See :meth:`Client.model`."""
        return ModelCard.from_json((await self._request("GET", "/v1/model")).json())

    async def health(self) -> dict[str, Any]:
        """See :meth:`Client.health`."""
        body: dict[str, Any] = (await self._request("GET", "/health")).json()
        return body

    async def ready(self) -> bool:
        """See :meth:`Client.ready`."""
        request = self._build_request(self._http, "GET", "/ready")
        try:
            return (await self._http.send(request)).status_code == 200
        except httpx.TransportError:
            return False

    async def attribute_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        concurrency: int = 4,
        progress: bool = True,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """See :meth:`Client.attribute_many`."""
        items = self._many(requests)
        gate = asyncio.Semaphore(max(1, concurrency))
        bar = ProgressBar(len(items), enabled=progress)

        async def one(item: dict[str, Any]) -> Any:
            async with gate:
                try:
                    return await self.attribute(**item)
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

    async def _request(
        self, method: str, path: str, body: Any = None, binary: bool = False
    ) -> httpx.Response:
        """See :meth:`Client._request`."""
        attempt = 0
        while True:
            request = self._build_request(self._http, method, path, body, binary)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._retry_delay(attempt, request, error=exc)
            else:
                if response.is_success:
                    return response
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
