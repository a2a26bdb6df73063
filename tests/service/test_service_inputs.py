"""What users trip over, over HTTP: labels of a list of head layers, each position's own
default target, chat ``messages``, the input limit before anything else, and ``/docs``
without internet (a real browser against a real server)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from depass_client import Client
from engine import DePassEngine
from engine.testing import tiny_model, word_tokenizer
from tests.service.conftest import PROMPT, running
from tests.service.support import assert_envelope

#: A minimal chat template over the word tokenizer's words.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}the{% endif %}"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def chat_engine() -> DePassEngine:
    """A tiny three-layer Llama whose tokenizer has a chat template."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return DePassEngine(tiny_model("llama", seed=5, num_hidden_layers=3), tokenizer)


@pytest.mark.anyio
async def test_a_list_of_head_layers_is_labelled_per_layer(chat_engine: DePassEngine) -> None:
    body = {"prompt": PROMPT, "granularity": "head", "start_layer": [0, 2], "positions": [-1]}
    async with running(chat_engine) as (_, client):
        reply = (await client.post("/v1/attributions", json=body)).json()
    assert reply["layers"] == [0, 2] and reply["scores"]["shape"] == [2, 1, 5, 1]
    assert reply["components"] == ["rest", "H0", "H1", "H2", "H3"]
    assert [labels[1] for labels in reply["layer_components"]] == ["L0.H0", "L2.H0"]


@pytest.mark.anyio
async def test_each_position_is_scored_on_its_own_next_token(chat_engine: DePassEngine) -> None:
    ids = chat_engine.tokenize(PROMPT)
    async with running(chat_engine) as (_, client):
        body = {"input_ids": ids, "positions": [1, -1], "array_encoding": "list"}
        reply = (await client.post("/v1/attributions", json=body)).json()
    own = [int(chat_engine.trace(ids[: p + 1]).last_logits.argmax()) for p in reply["positions"]]
    assert reply["position_targets"] == [[own[0]], [own[1]]] and reply["targets"] == [own[1]]
    assert reply["first_positions"] == list(range(len(ids)))


@pytest.mark.anyio
async def test_messages_over_http(chat_engine: DePassEngine) -> None:
    chat = [{"role": "system", "content": "the"}, {"role": "user", "content": "capital of"}]
    want = chat_engine.chat_ids(chat)
    async with running(chat_engine) as (_, client):
        reply = await client.post("/v1/attributions", json={"messages": chat, "positions": [-1]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["input_ids"] == want and reply.json()["tokens"][-1] == "the"
        generated = await client.post("/v1/generate", json={"messages": chat, "max_new_tokens": 2})
        assert generated.status_code == 200, generated.text
        assert generated.json()["prompt_ids"] == want
        for body, param in (
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
            ({"messages": [{"role": "user"}]}, "messages"),
            ({"messages": chat, "prompt": "the"}, "prompt"),
        ):
            assert_envelope(await client.post("/v1/attributions", json=body), 422, param)
    too_long = [{"role": "user", "content": "the " * 40}]
    async with running(chat_engine, max_input_tokens=16) as (_, client):
        error = assert_envelope(
            await client.post("/v1/attributions", json={"messages": too_long}),
            413,
            "messages",
        )
        assert error["code"] == "input_too_long"


@pytest.mark.anyio
async def test_a_model_without_a_chat_template_gets_a_clear_422() -> None:
    plain = DePassEngine(tiny_model("llama", seed=3), word_tokenizer())
    async with running(plain) as (_, client):
        for route in ("/v1/attributions", "/v1/generate"):
            body = {"messages": [{"role": "user", "content": "the capital"}]}
            error = assert_envelope(await client.post(route, json=body), 422, "messages")
            assert "no chat template" in error["message"]


@pytest.mark.anyio
async def test_the_input_limit_is_checked_before_the_memory_estimate() -> None:
    # every request is over this engine's memory budget; the input limit must answer first
    starved = DePassEngine(tiny_model("llama", seed=3), word_tokenizer(), memory_budget_bytes=1)
    prompt = " ".join(["the"] * 40)  # 41 tokens, over the limit of 16
    async with running(starved, max_input_tokens=16) as (_, client):
        for extra in ({}, {"positions": [-1]}):
            response = await client.post("/v1/attributions", json={"prompt": prompt, **extra})
            error = assert_envelope(response, 413, "prompt")
            assert error["code"] == "input_too_long" and "limit of 16" in error["message"]
        ids = {"input_ids": [4] * 40}
        error = assert_envelope(await client.post("/v1/attributions", json=ids), 413, "input_ids")
        assert error["code"] == "input_too_long"
        short = await client.post("/v1/attributions", json={"prompt": "the capital"})
        assert assert_envelope(short, 413, "prompt")["code"] == "memory_budget"


# ---------------------------------------------------------------------------- /docs offline


@pytest.fixture(scope="module")
def browser() -> Iterator[str]:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    yield path


def rendered(browser: str, url: str) -> str:
    """The DOM of ``url`` after its scripts ran, in headless Chromium that can reach only
    127.0.0.1 (every other host name fails to resolve: a machine without internet)."""
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_docs_pages_render_without_internet(server: str, browser: str) -> None:
    page = httpx.get(f"{server}/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = httpx.get(f"{server}/docs-assets/{asset}")
        assert response.status_code == 200 and len(response.content) > 100_000, asset
    swagger = rendered(browser, f"{server}/docs")
    assert 'class="title">DePass Serve' in swagger  # Swagger UI drew the OpenAPI document
    assert "/v1/attributions" in swagger and "/v1/generate" in swagger
    redoc = rendered(browser, f"{server}/redoc")
    assert "/v1/attributions" in redoc and "DePass Serve" in redoc


def test_sdk_messages_and_per_layer_tables(server: str) -> None:
    """The SDK over real HTTP: a list of head layers gives each layer's own labels."""
    with Client(server, max_retries=0) as client:
        result = client.attribute(PROMPT, granularity="head", start_layer=[0, 1], positions=[-1])
        assert [name for name, _ in result.top_components(5, layer=0) if name != "rest"]
        assert all(
            name.startswith(f"L{layer}.") or name == "rest"
            for index, layer in enumerate(result.layers)
            for name, _ in result.top_components(5, layer=index)
        )
        copy.deepcopy(result)  # results are plain data
