"""Batching and the memory budget, in-process: queued small requests run as one batch
with the results each gets alone; a request over the memory budget gets 413 before any
model work."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch

from engine import AttributionRequest, DePassEngine
from engine.testing import tiny_model, word_tokenizer
from service.arrays import decode_array
from tests.service.conftest import running
from tests.service.support import assert_envelope

pytestmark = pytest.mark.anyio

PROMPTS = [
    "the capital of France is",
    "Mary and John went to the store",
    "a b c",
    "John gave a drink to Mary",
    "the cat sat on the mat and the dog",
]


def make_engine(**kwargs: Any) -> DePassEngine:
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer(), **kwargs)


async def test_queued_requests_run_as_one_batch_with_their_own_results() -> None:
    """The first request holds the worker until the others are queued; they then run as
    one batch, and every answer equals the engine's answer for that request alone."""
    engine = make_engine()
    release = threading.Event()
    held = {"first": True}

    def hold_first(operation: str) -> None:
        if operation == "attribute" and held.pop("first", False):
            release.wait(10)

    bodies = [{"prompt": p, "outputs": ["scores", "states"]} for p in PROMPTS]
    async with running(engine, fault_injector=hold_first, max_batch=8) as (app, client):
        first = asyncio.create_task(client.post("/v1/attributions", json=bodies[0]))
        await asyncio.sleep(0.2)  # the first request is on the worker, held
        rest = [
            asyncio.create_task(client.post("/v1/attributions", json=body)) for body in bodies[1:]
        ]
        while app.state.serving.worker.depth < len(rest):
            await asyncio.sleep(0.02)
        release.set()
        responses = [await first, *[await task for task in rest]]
        batch_sizes = app.state.metrics.batch_size.collect()[0].samples
    sizes = [r.json()["timings"]["batch_size"] for r in responses]
    assert sizes == [1] + [len(rest)] * len(rest)
    count = next(s.value for s in batch_sizes if s.name.endswith("_count"))
    assert count == 1
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        want = engine.attribute(AttributionRequest(**body))
        data = response.json()
        assert data["components"] == want.components
        np.testing.assert_allclose(
            decode_array(**data["states"], max_bytes=1 << 30), want.states.numpy(), atol=2e-6
        )
        np.testing.assert_allclose(
            decode_array(**data["scores"], max_bytes=1 << 30), want.scores.numpy(), atol=2e-6
        )


async def test_batching_off_runs_each_request_alone() -> None:
    engine = make_engine()
    async with running(engine, max_batch=1) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/v1/attributions", json={"prompt": p}) for p in PROMPTS)
        )
    assert [r.json()["timings"]["batch_size"] for r in responses] == [1] * len(PROMPTS)


async def test_request_over_the_memory_budget_is_413_before_any_work() -> None:
    """The estimate is in the message; no forward pass ran (nothing was traced), and the
    next request that fits is served."""
    engine = make_engine(memory_budget_bytes=1 << 20)
    long_prompt = " ".join(["the cat sat on the mat"] * 30)
    async with running(engine) as (_, client):
        response = await client.post(
            "/v1/attributions", json={"prompt": long_prompt, "outputs": ["states"]}
        )
        error = assert_envelope(response, 413, param="prompt")
        assert error["code"] == "memory_budget"
        assert "needs an estimated" in error["message"] and "budget of 1.0 MiB" in error["message"]
        assert len(engine.traces) == 0  # refused before the forward pass
        ok = await client.post("/v1/attributions", json={"prompt": PROMPTS[0]})
        assert ok.status_code == 200, ok.text


def test_engine_refuses_before_tracing() -> None:
    engine = make_engine(memory_budget_bytes=1 << 20)
    request = AttributionRequest(prompt=" ".join(["the cat sat on the mat"] * 30))
    with pytest.raises(Exception, match="needs an estimated") as caught:
        engine.attribute(request)
    assert type(caught.value).__name__ == "MemoryBudgetError"
    assert caught.value.estimate.total > caught.value.budget_bytes
    assert len(engine.traces) == 0
    assert torch.is_tensor(engine.attribute(AttributionRequest(prompt="a b c")).logits)


async def test_a_failed_batch_runs_its_requests_one_by_one() -> None:
    """When the batch call fails, each queued request runs alone, so an error reaches only
    the request that caused it (here every one succeeds on its own)."""
    engine = make_engine()
    release = threading.Event()
    state = {"calls": 0}

    def hold_then_fail_batch(operation: str) -> None:
        state["calls"] += 1
        if state["calls"] == 1:
            release.wait(10)  # the first request holds the worker
        elif state["calls"] == 2:
            raise RuntimeError("injected failure of the batch call")

    async with running(engine, fault_injector=hold_then_fail_batch, max_batch=8) as (
        app,
        client,
    ):
        first = asyncio.create_task(client.post("/v1/attributions", json={"prompt": PROMPTS[0]}))
        await asyncio.sleep(0.2)
        rest = [
            asyncio.create_task(client.post("/v1/attributions", json={"prompt": p}))
            for p in PROMPTS[1:]
        ]
        while app.state.serving.worker.depth < len(rest):
            await asyncio.sleep(0.02)
        release.set()
        responses = [await first, *[await task for task in rest]]
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert [r.json()["timings"]["batch_size"] for r in responses] == [1] * len(PROMPTS)
    assert state["calls"] == 2 + len(rest)  # the failed batch, then each alone
