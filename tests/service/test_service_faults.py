"""Faults, in-process: a request past its deadline, or whose client left, is stopped between
layers and frees the worker at once; an out-of-memory error frees memory and the service
keeps serving.

:class:`PacedEngine` makes every unit of engine work (what lies between two polls of
``should_stop``: a layer, a chunk) take ``UNIT_S`` seconds, so that "the worker is free
right after" can be told apart from "the worker finished the abandoned job first".
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
import torch

from depass_client import AsyncClient, ServiceTimeoutError
from engine import AttributionRequest, AttributionResult, Cancelled, DePassEngine
from engine.testing import tiny_model, word_tokenizer
from service.generation import continue_ids
from tests.service.conftest import PROMPT, running
from tests.service.support import assert_envelope, attribution_scope

pytestmark = pytest.mark.anyio

UNIT_S = 0.3
BODY = {"prompt": PROMPT, "positions": [-1]}


class PacedEngine(DePassEngine):
    """A tiny engine whose work units take ``UNIT_S`` each while ``paced`` is set."""

    def __init__(self) -> None:
        super().__init__(tiny_model("llama", seed=3), word_tokenizer())
        self.paced = threading.Event()
        self.units = 0
        self.cancelled: list[float] = []  # monotonic times of Cancelled

    def attribute_many(
        self,
        requests: Sequence[AttributionRequest],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[AttributionResult]:
        """Every attribution path (one request, or a batch) goes through here."""

        def paced_stop() -> bool:
            if self.paced.is_set():
                time.sleep(UNIT_S)
            self.units += 1
            return should_stop is not None and should_stop()

        try:
            return super().attribute_many(requests, should_stop=paced_stop)
        except Cancelled:
            self.cancelled.append(time.monotonic())
            raise


def stopped(registry: Any, reason: str) -> float | None:
    return registry.get_sample_value("depass_stopped_jobs_total", {"reason": reason})


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def paced() -> PacedEngine:
    engine = PacedEngine()
    engine.attribute(AttributionRequest(**BODY))
    assert engine.units >= 5, "the request must span several units of work"
    return engine


async def test_a_request_past_its_timeout_is_stopped_and_frees_the_worker(
    paced: PacedEngine,
) -> None:
    units = paced.units  # of one whole request
    full_s = units * UNIT_S
    async with running(paced, request_timeout_s=2 * UNIT_S) as (app, client):
        paced.paced.set()
        start = time.monotonic()
        slow = await client.post("/v1/attributions", json=BODY)
        assert assert_envelope(slow, 504)["code"] == "timeout"
        paced.paced.clear()  # the follow-up work is quick
        follow_up = await client.post("/v1/attributions", json=BODY)
        done = time.monotonic() - start
        assert follow_up.status_code == 200, follow_up.text
        # the slow job stopped at its first poll after the deadline, not after its work
        assert len(paced.cancelled) == 1
        assert paced.cancelled[0] - start < 2 * UNIT_S + 2 * UNIT_S
        assert done < full_s - UNIT_S, (
            f"the follow-up waited {done:.2f} s (full job {full_s:.1f} s)"
        )
        assert stopped(app.state.metrics.registry, "expired") == 1


async def test_the_sdk_does_not_repeat_a_request_past_the_deadline(paced: PacedEngine) -> None:
    """The service marks its 504 ``x-should-retry: false``; the SDK raises at once instead
    of running the same slow request three times."""
    async with running(paced, request_timeout_s=2 * UNIT_S) as (app, client):
        paced.paced.set()
        sdk = AsyncClient(base_url="http://test", http_client=client, max_retries=2)
        with pytest.raises(ServiceTimeoutError) as caught:
            await sdk.attribute(**BODY)
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert caught.value.code == "timeout"
        await wait_for(lambda: len(paced.cancelled) == 1, timeout_s=60)
        paced.paced.clear()
        requests = app.state.metrics.registry.get_sample_value(
            "depass_requests_total",
            {
                "route": "/v1/attributions",
                "method": "POST",
                "granularity": "token",
                "status": "504",
            },
        )
        assert requests == 1  # one 504, not three: the service did the slow work once


async def test_a_client_that_leaves_mid_run_stops_its_job(paced: PacedEngine) -> None:
    async with running(paced) as (app, client):
        paced.paced.set()
        gone = anyio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": json.dumps(BODY).encode()}
            if not gone.is_set():
                await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            pass

        scope = attribution_scope([(b"content-type", b"application/json"), (b"host", b"test")])
        leaving = asyncio.create_task(app(scope, receive, send))
        worker = app.state.serving.worker
        await wait_for(lambda: worker.busy)
        start = time.monotonic()
        gone.set()
        await asyncio.wait_for(leaving, 10)
        paced.paced.clear()
        follow_up = await client.post("/v1/attributions", json=BODY)
        assert follow_up.status_code == 200
        assert len(paced.cancelled) == 1 and paced.cancelled[0] - start < 3 * UNIT_S
        assert time.monotonic() - start < 4 * UNIT_S
        assert stopped(app.state.metrics.registry, "disconnected") == 1


async def test_out_of_memory_frees_memory_and_the_next_request_succeeds(
    llama_engine: DePassEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleared: list[int] = []
    clear_cache = llama_engine.clear_cache

    def counting_clear_cache() -> None:
        cleared.append(len(llama_engine.traces))
        clear_cache()

    monkeypatch.setattr(llama_engine, "clear_cache", counting_clear_cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    armed = threading.Event()

    def inject(operation: str) -> None:
        if armed.is_set():
            armed.clear()
            hog = torch.empty(64 * 1024**2, dtype=torch.uint8, device=device)  # held by the frame
            raise torch.OutOfMemoryError(f"out of memory with {hog.numel()} bytes held")

    async with running(llama_engine, fault_injector=inject) as (app, client):
        assert (await client.post("/v1/attributions", json=BODY)).status_code == 200
        assert len(llama_engine.traces)  # a trace in the cache
        baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
        armed.set()
        response = await client.post("/v1/attributions", json={**BODY, "prompt": "the capital"})
        assert assert_envelope(response, 503)["code"] == "out_of_memory"
        assert cleared and cleared[-1] >= 1 and len(llama_engine.traces) == 0
        if device == "cuda":  # the frame that held the tensor is gone, the cache emptied
            assert torch.cuda.memory_allocated() <= baseline
        again = await client.post("/v1/attributions", json=BODY)
        assert again.status_code == 200, again.text
        assert app.state.metrics.registry.get_sample_value("depass_out_of_memory_total") == 1


def test_generation_stops_between_tokens_when_told() -> None:
    model = tiny_model("llama", seed=3)
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > 2

    with pytest.raises(Cancelled):
        continue_ids(model, [1, 4, 25], 10, should_stop=should_stop)
    assert polls == 3  # two tokens, then the stop
    assert len(continue_ids(model, [1, 4, 25], 3, should_stop=lambda: False).ids) == 3
