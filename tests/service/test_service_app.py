"""The app in-process (ASGI, no sockets): validation, limits, auth, queue, faults, envelope."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors

from engine import DePassEngine
from service import create_app
from service.arrays import encode_array
from service.protocol import SAFETENSORS_MEDIA_TYPE
from tests.service.conftest import PROMPT, running, settings
from tests.service.support import assert_envelope, attribution_scope

pytestmark = pytest.mark.anyio

SUBSPACE_OK = encode_array(np.ones((1, 6, 32), np.float32), "base64")


# ---------------------------------------------------------------------------- 422


INVALID_ATTRIBUTIONS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": PROMPT, "input_ids": [1, 2]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, -2]}, "input_ids"),
    ({"input_ids": "12"}, "input_ids"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": PROMPT, "granularity": "layer"}, "granularity"),
    ({"prompt": PROMPT, "start_layer": -1}, "start_layer"),
    ({"prompt": PROMPT, "start_layer": [0, 1]}, "start_layer"),
    ({"prompt": PROMPT, "end_layer": "top"}, "end_layer"),
    ({"prompt": PROMPT, "granularity": "module"}, "module"),
    ({"prompt": PROMPT, "module": "attn"}, "module"),
    ({"prompt": PROMPT, "neurons": [1]}, "neurons"),
    ({"prompt": PROMPT, "groups": [[0, 1], [1]]}, "groups"),
    ({"prompt": PROMPT, "granularity": "subspace"}, "subspace"),
    ({"prompt": PROMPT, "subspace": SUBSPACE_OK}, "subspace"),
    ({"prompt": PROMPT, "mlp_split": "gelu"}, "mlp_split"),
    ({"prompt": PROMPT, "temperature": 0}, "temperature"),
    ({"prompt": PROMPT, "ignore_bos": "maybe"}, "ignore_bos"),
    ({"prompt": PROMPT, "all_layers": True, "granularity": "head"}, "all_layers"),
    ({"prompt": PROMPT, "targets": [[1]]}, "targets"),
    ({"prompt": PROMPT, "positions": ["last"]}, "positions"),
    ({"prompt": PROMPT, "outputs": []}, "outputs"),
    ({"prompt": PROMPT, "outputs": ["logits"]}, "outputs"),
    ({"prompt": PROMPT, "layer": 3}, "layer"),
    ({"prompt": PROMPT, "array_encoding": "xml"}, "array_encoding"),
    ({"prompt": PROMPT, "array_dtype": "int8"}, "array_dtype"),
    # model-dependent (the engine's RequestError)
    ({"prompt": PROMPT, "start_layer": 3}, "start_layer"),
    ({"prompt": PROMPT, "granularity": "head", "start_layer": [0, 5]}, "start_layer"),
    ({"prompt": PROMPT, "end_layer": 3}, "end_layer"),
    ({"prompt": PROMPT, "granularity": "neuron", "neurons": [48]}, "neurons"),
    ({"prompt": PROMPT, "groups": [[0], [9]]}, "groups"),
    ({"prompt": PROMPT, "positions": [6]}, "positions"),
    ({"prompt": PROMPT, "targets": [96]}, "targets"),
    ({"prompt": PROMPT, "targets": ["zebra-crossing"]}, "targets"),
    ({"input_ids": [1, 500]}, "input_ids"),
]

SUBSPACE = {"prompt": PROMPT, "granularity": "subspace", "start_layer": 1}
INVALID_SUBSPACES: list[dict[str, Any]] = [
    {"dtype": "int8", "shape": [1, 6, 32], "encoding": "base64", "data": ""},
    {"dtype": "float32", "shape": [1, 6, 32], "encoding": "pickle", "data": ""},
    {"dtype": "float32", "shape": [1, 6, 32], "encoding": "base64", "data": "not base64!"},
    {"dtype": "float32", "shape": [1, 6, 32], "encoding": "zstd+base64", "data": "AAAA"},
    encode_array(np.ones((1, 6, 31), np.float32), "base64") | {"shape": [1, 6, 32]},
    encode_array(np.ones((6, 32), np.float32), "base64"),  # (K, N, D) needed
    encode_array(np.ones((1, 5, 32), np.float32), "zstd+base64"),  # N != 6 tokens
    encode_array(np.ones((1, 6, 31), np.float32), "list"),  # D != 32
    encode_array(np.full((1, 6, 32), np.nan, np.float32), "base64"),
    {"dtype": "float32", "shape": [1, 6, 2], "encoding": "list", "data": [[[1, "a"]] * 6]},
    {"dtype": "float32", "shape": [1, 2, 2], "encoding": "list", "data": [[[1, 2], [3]]]},
    {"dtype": "float32", "shape": [10**9, 10**9, 32], "encoding": "base64", "data": ""},
    {"dtype": "float32", "shape": [1, 6, 32], "encoding": "base64", "data": 5},
]


async def test_invalid_attribution_fields_get_422_naming_them(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        for fields, param in INVALID_ATTRIBUTIONS:
            response = await client.post("/v1/attributions", json=fields)
            error = assert_envelope(response, 422, param)
            assert error["type"] == "invalid_request_error"


async def test_invalid_subspace_arrays_get_422_naming_subspace(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        for array in INVALID_SUBSPACES:
            response = await client.post("/v1/attributions", json=SUBSPACE | {"subspace": array})
            assert_envelope(response, 422, "subspace")
        ok = await client.post("/v1/attributions", json=SUBSPACE | {"subspace": SUBSPACE_OK})
        assert ok.status_code == 200, ok.text


async def test_non_finite_numbers_get_422(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        for value in ("NaN", "Infinity"):
            body = '{"prompt": "the capital", "temperature": VALUE}'.replace("VALUE", value)
            response = await client.post(
                "/v1/attributions", content=body, headers={"content-type": "application/json"}
            )
            assert_envelope(response, 422, "temperature")


INVALID_GENERATIONS: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt"),
    ({"prompt": PROMPT, "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": PROMPT, "max_new_tokens": 65}, "max_new_tokens"),  # over the service limit
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "mlp_split": "gelu"}, "mlp_split"),
    ({"prompt": PROMPT, "split_temperature": 0}, "split_temperature"),
    ({"input_ids": [1, 500]}, "input_ids"),
    ({"prompt": PROMPT, "granularity": "head"}, "granularity"),
]


async def test_invalid_generate_and_tokenize_fields_get_422(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        for fields, param in INVALID_GENERATIONS:
            assert_envelope(await client.post("/v1/generate", json=fields), 422, param)
        assert_envelope(await client.post("/v1/tokenize", json={"prompt": ""}), 422, "prompt")
        assert_envelope(await client.post("/v1/tokenize", json={}), 422, "prompt")


# ---------------------------------------------------------------------------- 413


async def test_input_over_the_token_limit_gets_413(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, max_input_tokens=5) as (_, client):
        error = assert_envelope(
            await client.post("/v1/attributions", json={"prompt": PROMPT}), 413, "prompt"
        )
        assert error["code"] == "input_too_long" and "6 tokens" in error["message"]
        ids = {"input_ids": [1, 4, 5, 6, 7, 8]}
        assert_envelope(await client.post("/v1/attributions", json=ids), 413, "input_ids")
        # generation counts the prompt and the tokens it will attribute
        body = {"prompt": "the capital", "max_new_tokens": 4}
        assert_envelope(await client.post("/v1/generate", json=body), 413, "prompt")
        ok = await client.post("/v1/attributions", json={"prompt": "the capital of"})
        assert ok.status_code == 200


async def test_response_estimate_over_the_limit_gets_413_before_compute(
    llama_engine: DePassEngine,
) -> None:
    ran: list[str] = []
    async with running(llama_engine, fault_injector=ran.append, max_response_bytes=4096) as (
        _,
        client,
    ):
        big = {"prompt": PROMPT, "outputs": ["states", "scores"]}
        error = assert_envelope(await client.post("/v1/attributions", json=big), 413)
        assert error["code"] == "response_too_large"
        message = error["message"]
        # (P=6) * (M+1=7) * (D=32 + T=1) + P*T logits = 1392 floats = 5568 bytes
        assert "5.4 KiB" in message and "4.0 KiB" in message
        for hint in ("positions", "outputs=['scores']", "float16"):
            assert hint in message
        assert ran == []  # refused before the worker
        half = big | {"array_dtype": "float16"}
        assert (await client.post("/v1/attributions", json=half)).status_code == 200
        small = big | {"positions": [-1]}
        assert (await client.post("/v1/attributions", json=small)).status_code == 200


async def test_body_over_the_limit_gets_413(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, max_body_bytes=256) as (_, client):
        body = {"prompt": " ".join(["the"] * 100)}
        error = assert_envelope(await client.post("/v1/attributions", json=body), 413)
        assert error["code"] == "body_too_large"

        async def chunks() -> Any:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(40):
                yield b"the the the "
            yield b'"}'

        streamed = await client.post(
            "/v1/attributions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert assert_envelope(streamed, 413)["code"] == "body_too_large"


# ---------------------------------------------------------------------------- 401


async def test_api_key_is_enforced_on_v1_only(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, api_key="s3cret-key") as (_, client):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            response = await client.get("/v1/model", headers=headers)
            error = assert_envelope(response, 401)
            assert error["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
            assert "s3cret-key" not in response.text
        unauthorised = await client.post("/v1/attributions", json={"prompt": PROMPT})
        assert_envelope(unauthorised, 401)
        good = {"Authorization": "Bearer s3cret-key"}
        assert (await client.get("/v1/model", headers=good)).json()["auth_required"] is True
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


# ---------------------------------------------------------------------------- 429, 504, skips


class Gate:
    """A fault injector that holds every job until opened (and counts them)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.calls: list[str] = []

    def __call__(self, operation: str) -> None:
        self.calls.append(operation)
        self.entered.set()
        self.opened.wait(30)


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def skipped(registry: Any, reason: str) -> float | None:
    return registry.get_sample_value("depass_skipped_jobs_total", {"reason": reason})


async def test_full_queue_gets_429_with_retry_after(llama_engine: DePassEngine) -> None:
    gate = Gate()
    async with running(llama_engine, fault_injector=gate, max_queue=1) as (app, client):
        body = {"prompt": PROMPT, "positions": [-1]}
        running_one = asyncio.create_task(client.post("/v1/attributions", json=body))
        await wait_for(gate.entered.is_set)
        queued = asyncio.create_task(client.post("/v1/attributions", json=body))
        await wait_for(lambda: app.state.serving.worker.depth == 1)
        refused = await client.post("/v1/attributions", json=body)
        error = assert_envelope(refused, 429)
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
        gate.opened.set()
        assert (await running_one).status_code == 200
        assert (await queued).status_code == 200
        assert (await client.post("/v1/attributions", json=body)).status_code == 200


async def test_requests_past_the_timeout_get_504_and_queued_ones_are_dropped(
    llama_engine: DePassEngine,
) -> None:
    gate = Gate()
    async with running(llama_engine, fault_injector=gate, request_timeout_s=0.5) as (app, client):
        body = {"prompt": PROMPT, "positions": [-1]}
        first = asyncio.create_task(client.post("/v1/attributions", json=body))
        await wait_for(gate.entered.is_set)
        second = await client.post("/v1/attributions", json=body)  # waits in the queue
        assert assert_envelope(second, 504)["code"] == "timeout"
        assert assert_envelope(await first, 504)["code"] == "timeout"
        gate.opened.set()
        registry = app.state.metrics.registry
        await wait_for(lambda: skipped(registry, "expired") == 1)
        assert gate.calls == ["attribute"]  # the expired job never ran
        assert (await client.post("/v1/attributions", json=body)).status_code == 200


async def test_a_client_that_disconnects_while_queued_costs_no_compute(
    llama_engine: DePassEngine,
) -> None:
    gate = Gate()
    async with running(llama_engine, fault_injector=gate) as (app, client):
        body = {"prompt": PROMPT, "positions": [-1]}
        first = asyncio.create_task(client.post("/v1/attributions", json=body))
        await wait_for(gate.entered.is_set)
        gone = anyio.Event()
        sent: list[dict] = []
        payload = json.dumps(body).encode()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            if not gone.is_set():  # like uvicorn: no await once disconnected
                await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = attribution_scope([(b"content-type", b"application/json"), (b"host", b"test")])
        leaving = asyncio.create_task(app(scope, receive, send))
        await wait_for(lambda: app.state.serving.worker.depth == 1)
        gone.set()
        await asyncio.wait_for(leaving, 10)
        gate.opened.set()
        assert (await first).status_code == 200
        registry = app.state.metrics.registry
        await wait_for(lambda: skipped(registry, "disconnected") == 1)
        assert gate.calls == ["attribute"]  # the abandoned job never ran


# ---------------------------------------------------------------------------- 503


async def test_out_of_memory_gets_503_then_the_service_keeps_serving(
    llama_engine: DePassEngine,
) -> None:
    faults = iter([torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")])

    def inject(operation: str) -> None:
        fault = next(faults, None)
        if fault is not None:
            raise fault

    async with running(llama_engine, fault_injector=inject) as (app, client):
        llama_engine.trace(llama_engine.tokenize(PROMPT))  # something in the cache
        body = {"prompt": PROMPT, "positions": [-1]}
        response = await client.post("/v1/attributions", json=body)
        error = assert_envelope(response, 503)
        assert error["code"] == "out_of_memory" and "Tried to allocate" not in error["message"]
        # the same request would redo the same work: clients are told not to retry it
        assert (
            response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
        )
        assert len(llama_engine.traces) == 0  # the trace cache was freed
        assert app.state.metrics.registry.get_sample_value("depass_out_of_memory_total") == 1
        again = await client.post("/v1/attributions", json=body)
        assert again.status_code == 200, again.text
        metrics = (await client.get("/metrics")).text
        assert "depass_out_of_memory_total 1.0" in metrics


def test_not_ready_before_the_model_is_loaded(llama_engine: DePassEngine) -> None:
    app = create_app(settings(), engine=llama_engine)
    client = TestClient(app)  # no `with`: the lifespan has not run, nothing is loaded
    assert client.get("/health").json() == {"status": "ok"}
    for response in (
        client.get("/ready"),
        client.get("/v1/model"),
        client.post("/v1/attributions", json={"prompt": PROMPT}),
    ):
        error = assert_envelope(response, 503)
        assert error["code"] == "not_ready" and "retry-after" in response.headers
    with TestClient(app) as started:
        assert started.get("/ready").json() == {"status": "ready", "model": "tiny-llama"}
    assert client.get("/ready").status_code == 503  # and again after shutdown


# ---------------------------------------------------------------------------- envelope


async def test_every_failure_uses_the_envelope(llama_engine: DePassEngine) -> None:
    def explode(operation: str) -> None:
        raise RuntimeError("boom: internal detail /secret/path")

    async with running(llama_engine, fault_injector=explode, raise_app_exceptions=False) as (
        _,
        client,
    ):
        assert assert_envelope(await client.get("/v2/nothing"), 404)["code"] == "not_found"
        wrong = await client.get("/v1/attributions")
        assert assert_envelope(wrong, 405)["code"] == "method_not_allowed"
        broken = await client.post(
            "/v1/attributions", content=b'{"prompt": ', headers={"content-type": "application/json"}
        )
        assert assert_envelope(broken, 400)["code"] == "invalid_json"
        crash = await client.post("/v1/attributions", json={"prompt": PROMPT})
        error = assert_envelope(crash, 500)
        assert error == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
        assert "boom" not in crash.text and "Traceback" not in crash.text


# ---------------------------------------------------------------------------- responses


async def test_safetensors_response_holds_the_same_arrays(
    llama_engine: DePassEngine, tmp_path: Path
) -> None:
    async with running(llama_engine) as (_, client):
        body = {"prompt": PROMPT, "outputs": ["states", "scores"], "array_encoding": "list"}
        as_json = (await client.post("/v1/attributions", json=body)).json()
        binary = await client.post(
            "/v1/attributions", json=body, headers={"Accept": SAFETENSORS_MEDIA_TYPE}
        )
        assert binary.headers["content-type"] == SAFETENSORS_MEDIA_TYPE
        tensors = load_safetensors(binary.content)
        assert set(tensors) == {"scores", "remainder_scores", "states", "remainder", "logits"}
        for name, array in tensors.items():
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, np.asarray(as_json[name]["data"], np.float32))
        path = tmp_path / "response.safetensors"
        path.write_bytes(binary.content)
        with safe_open(str(path), "np") as handle:
            fields = json.loads(handle.metadata()["depass"])
        assert fields["tokens"] == as_json["tokens"]
        assert fields["components"] == as_json["components"]


async def test_metrics_count_routes_granularities_and_statuses(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        body = {"prompt": PROMPT, "granularity": "head", "start_layer": 1, "positions": [-1]}
        assert (await client.post("/v1/attributions", json=body)).status_code == 200
        await client.post("/v1/attributions", json={"prompt": PROMPT, "granularity": "x"})
        text = (await client.get("/metrics")).text
    assert (
        'depass_requests_total{granularity="head",method="POST",route="/v1/attributions",'
        'status="200"} 1.0'
    ) in text
    assert 'route="/v1/attributions",status="422"' in text
    for name in (
        "depass_request_duration_seconds_bucket",
        "depass_queue_depth_requests 0.0",
        'depass_input_tokens_bucket{le="16.0",operation="attribute"} 1.0',
        "depass_gpu_peak_memory_bytes",
        "depass_engine_duration_seconds_count",
        "depass_model_loaded 1.0",
    ):
        assert name in text, name


async def test_openapi_documents_routes_and_the_envelope(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        spec = (await client.get("/openapi.json")).json()
        assert (await client.get("/docs")).status_code == 200
    paths = {
        "/v1/attributions": "post",
        "/v1/generate": "post",
        "/v1/tokenize": "post",
        "/v1/model": "get",
        "/health": "get",
        "/ready": "get",
        "/metrics": "get",
    }
    for path, method in paths.items():
        assert method in spec["paths"][path], path
    attribution = spec["paths"]["/v1/attributions"]["post"]
    for status in ("401", "413", "422", "429", "503", "504"):
        schema = attribution["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse"), status
    assert SAFETENSORS_MEDIA_TYPE in attribution["responses"]["200"]["content"]
    subspace = spec["components"]["schemas"]["AttributionBody"]["properties"]["subspace"]
    assert "EncodedArray" in json.dumps(subspace)


def test_docs_can_be_disabled(llama_engine: DePassEngine) -> None:
    with TestClient(create_app(settings(docs_enabled=False), engine=llama_engine)) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/ready").status_code == 200
