"""What a new user meets first (issue 22): refusals that name the field once and say
what is accepted, no 500 on a repeated layer, metrics by route, the root redirect, and
the first-token rule reported in every attribution."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from depass_client import Attribution
from engine import DePassEngine
from tests.service.conftest import PROMPT, running, serve
from tests.service.support import assert_envelope

pytestmark = pytest.mark.anyio


async def _post(client: httpx.AsyncClient, body: str) -> httpx.Response:
    """A raw JSON body (so that NaN and Infinity go as JSON literals)."""
    return await client.post(
        "/v1/attributions", content=body, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"granularity": "head", "start_layer": [1, 1]}, "start_layer"),
        ({"targets": []}, "targets"),
        ({"prompt": "   "}, "prompt"),
    ],
)
async def test_refused_with_a_422_naming_the_field(
    llama_engine: DePassEngine, fields: dict[str, Any], param: str
) -> None:
    async with running(llama_engine, raise_app_exceptions=False) as (_, client):
        reply = await _post(client, json.dumps({"prompt": PROMPT, **fields}))
    assert_envelope(reply, 422, param)


async def test_each_refused_field_reads_as_one_sentence(llama_engine: DePassEngine) -> None:
    """NaN, -Infinity, Infinity and 0 get the same sentence (bar the value), and a union
    field (start_layer: an integer or a list) is named once, with what it accepts."""
    async with running(llama_engine) as (_, client):
        temperatures = {}
        for value in ("NaN", "-Infinity", "Infinity", "0"):
            reply = await _post(client, f'{{"prompt": "{PROMPT}", "temperature": {value}}}')
            temperatures[value] = assert_envelope(reply, 422, "temperature")["message"]
        reply = await _post(client, f'{{"prompt": "{PROMPT}", "start_layer": -1}}')
        start = assert_envelope(reply, 422, "start_layer")["message"]
    shapes = {m.replace(v, "VALUE", 1) for v, m in temperatures.items()}
    assert shapes == {
        "temperature: VALUE is not accepted; expected a finite number of at least 1e-06"
    }
    assert start.count("start_layer") == 1 and ";" in start, start
    assert start == (
        "start_layer: -1 is not accepted; expected an integer of at least 0, "
        "or a list of integers of at least 0"
    )


async def test_the_first_token_rule_applied_is_reported(llama_engine: DePassEngine) -> None:
    """The tiny tokenizer adds a BOS: the rule's default is on; asked off, it is off."""
    async with running(llama_engine) as (_, client):
        on = await client.post("/v1/attributions", json={"prompt": PROMPT})
        off = await client.post("/v1/attributions", json={"prompt": PROMPT, "ignore_bos": False})
        head = await client.post(
            "/v1/attributions", json={"prompt": PROMPT, "granularity": "head", "start_layer": 0}
        )
    assert on.json()["ignore_bos"] is True
    assert Attribution.from_json(on.json()).ignore_bos is True  # the SDK's type has it too
    assert off.json()["ignore_bos"] is False
    assert head.json()["ignore_bos"] is False


def _count(text: str, route: str, status: str) -> float:
    pattern = (
        rf'depass_requests_total{{[^}}]*route="{re.escape(route)}"[^}}]*status="{status}"}} (\S+)'
    )
    return sum(float(m) for m in re.findall(pattern, text))


async def test_metrics_count_each_request_under_the_route_it_was_sent_to(
    llama_engine: DePassEngine,
) -> None:
    """401s on /v1/*, /openapi.json and the viewer's files are no longer 'unmatched'."""
    async with running(llama_engine, api_key="key-0123456789abcdef") as (_, client):
        assert (await client.post("/v1/attributions", json={"prompt": PROMPT})).status_code == 401
        assert (await client.get("/v1/model")).status_code == 401
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/ui/")).status_code == 200
        assert (await client.get("/no-such-page")).status_code == 404
        text = (await client.get("/metrics")).text
    assert _count(text, "/v1/attributions", "401") == 1
    assert _count(text, "/v1/model", "401") == 1
    assert _count(text, "/openapi.json", "200") == 1
    assert _count(text, "/ui", "200") == 1
    assert _count(text, "unmatched", "404") == 1
    assert _count(text, "unmatched", "401") == 0


@pytest.mark.parametrize(
    ("overrides", "location"),
    [
        ({}, "ui/"),
        ({"ui_enabled": False}, "docs"),
        ({"ui_enabled": False, "docs_enabled": False}, None),
    ],
)
async def test_the_root_redirects_to_the_viewer_or_the_docs(
    llama_engine: DePassEngine, overrides: dict[str, Any], location: str | None
) -> None:
    async with running(llama_engine, **overrides) as (_, client):
        reply = await client.get("/")
    if location is None:
        assert_envelope(reply, 404)
    else:
        assert reply.status_code == 307 and reply.headers["location"] == location


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """The check runs first: a model folder that does not load (an empty one) would
    fail later, so the exit must come from the port, at once."""
    model = tmp_path / "not-a-model"
    model.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DEPASS_MODEL": str(model), "DEPASS_PORT": str(port)}
        env["DEPASS_HOST"] = "127.0.0.1"
        done = subprocess.run(
            [sys.executable, "-m", "service"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "DEPASS_PORT" in done.stderr and "loading" not in done.stderr


def test_a_request_that_cannot_finish_in_time_is_refused_at_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The real service, timeout 2 s: a 2,000-token token run (estimated at tens of
    seconds) is refused before it takes the worker, with the estimate and what would
    fit; the next request runs at once."""
    env = {
        "DEPASS_REQUEST_TIMEOUT_S": "2",
        "DEPASS_MAX_INPUT_TOKENS": "2048",
        # a fixed budget, so that the memory check (which comes first) lets it through
        # whatever this machine has free: the refusal must be the time estimate's
        "DEPASS_MEMORY_BUDGET_BYTES": str(16 * 2**30),
    }
    with serve(tiny_model_dir, tmp_path / "service.log", **env) as url:
        long = {"input_ids": [5 + i % 80 for i in range(2000)], "positions": [-1]}
        clock = time.perf_counter()
        refused = httpx.post(f"{url}/v1/attributions", json=long, timeout=60)
        refused_s = time.perf_counter() - clock
        clock = time.perf_counter()
        served = httpx.post(f"{url}/v1/attributions", json={"prompt": PROMPT}, timeout=60)
        served_s = time.perf_counter() - clock
    error = assert_envelope(refused, 413, "input_ids")
    assert error["code"] == "time_budget"
    message = error["message"]
    assert re.search(r"needs an estimated \d+ s of compute", message), message
    assert "DEPASS_REQUEST_TIMEOUT_S" in message
    fits = re.search(r"an input of at most (\d+) tokens", message)
    assert fits and 1 < int(fits.group(1)) < 2000, message
    assert "token groups" in message
    assert refused_s < 1.0, refused_s
    # the next request found the worker free: it did not queue behind the long one
    assert served.status_code == 200, served.text
    assert served.json()["timings"]["queue_s"] < 0.5, (served.json()["timings"], served_s)


async def test_the_input_limit_is_what_the_model_was_built_for(llama_engine: DePassEngine) -> None:
    """The tiny Llama has 256 positions: longer inputs are refused unless the operator
    raises DEPASS_MAX_INPUT_TOKENS (the service used to accept 2,048 whatever the model)."""
    assert llama_engine.model.config.max_position_embeddings == 256
    ids = {"input_ids": [5] * 257, "positions": [-1], "outputs": ["scores"]}
    async with running(llama_engine) as (_, client):
        card = (await client.get("/v1/model")).json()
        refused = await client.post("/v1/attributions", json=ids)
    assert card["limits"]["max_input_tokens"] == 256
    assert assert_envelope(refused, 413, "input_ids")["code"] == "input_too_long"
    async with running(llama_engine, max_input_tokens=300) as (_, client):
        assert (await client.post("/v1/attributions", json=ids)).status_code == 200


async def test_a_generation_that_cannot_finish_in_time_is_refused(
    llama_engine: DePassEngine,
) -> None:
    """/v1/generate attributes every generated token: sized at its longest, before it runs."""
    body = {"input_ids": [5] * 250, "max_new_tokens": 6}
    async with running(llama_engine, request_timeout_s=0.001, max_new_tokens=8) as (_, client):
        refused = await client.post("/v1/generate", json=body)
    assert assert_envelope(refused, 413, "input_ids")["code"] == "time_budget"
