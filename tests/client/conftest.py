"""Fixtures of the SDK unit tests: scripted services on ``httpx.MockTransport``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from depass_client import AsyncClient, Client

Reply = httpx.Response | Exception

#: A minimal attribution response, as the service sends it (plus a field from the future).
ATTRIBUTION = {
    "object": "attribution",
    "model": "m",
    "tokens": ["<s>", "a"],
    "input_ids": [1, 5],
    "components": ['tok[0]:"<s>"', 'tok[1]:"a"'],
    "positions": [1],
    "targets": [7],
    "target_tokens": ["b"],
    "granularity": "token",
    "mlp_split": "softmax",
    "end": "output",
    "layers": None,
    "conservation_error": 1e-7,
    "relative_conservation_error": 1e-8,
    "timings": {"total_s": 0.1},
    "scores": {
        "dtype": "float32",
        "shape": [1, 2, 1],
        "encoding": "list",
        "data": [[[0.5], [-0.25]]],
    },
    "remainder_scores": {"dtype": "float32", "shape": [1, 1], "encoding": "list", "data": [[0.0]]},
    "logits": {"dtype": "float32", "shape": [1, 1], "encoding": "list", "data": [[0.25]]},
    "states": None,
    "remainder": None,
    "future_field": "ignored by this SDK",
}


class Script:
    """Answers requests with scripted replies in order (the last one repeats); records them."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        # a fresh copy: a response's stream belongs to one exchange
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)


class RecordingClient(Client):
    """A client that records its backoff sleeps instead of sleeping."""

    def __init__(self, script: Script, **options: Any) -> None:
        super().__init__(
            base_url="http://depass.test",
            http_client=httpx.Client(transport=httpx.MockTransport(script)),
            **options,
        )
        self.sleeps: list[float] = []

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class RecordingAsyncClient(AsyncClient):
    """The asynchronous :class:`RecordingClient`."""

    def __init__(self, script: Script, **options: Any) -> None:
        super().__init__(
            base_url="http://depass.test",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(script)),
            **options,
        )
        self.sleeps: list[float] = []

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def envelope(
    status: int, message: str = "nope", param: str | None = None, **headers: str
) -> httpx.Response:
    """A service error response."""
    code = {422: "invalid_field", 429: "queue_full", 503: "not_ready"}.get(status, "x")
    body = {"error": {"message": message, "type": "t", "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
