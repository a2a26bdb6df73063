"""What the SDK sends: typed fields, per-call options, every route, and the readiness wait,
against a scripted service (``httpx.MockTransport``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import depass_client as dc
from depass_client._base import ROUTES
from tests.client.conftest import ATTRIBUTION, RecordingAsyncClient, RecordingClient, Script

NEXT_TOKENS = {
    "object": "next_tokens",
    "model": "m",
    "tokens": ["<s>", "a"],
    "input_ids": [1, 5],
    "positions": [1],
    "predictions": [
        [
            {"id": 7, "token": "b", "logit": 3.5, "probability": 0.75, "future": 1},
            {"id": 9, "token": "c", "logit": 2.0, "probability": 0.125},
        ]
    ],
}
GENERATION = {
    "object": "generation",
    "model": "m",
    "text": "b",
    "finish_reason": "length",
    "seed": None,
    "prompt_ids": [1, 5],
    "prompt_tokens": ["<s>", "a"],
    "generated_ids": [7],
    "generated_tokens": ["b"],
    "components": ['tok[0]:"<s>"', 'tok[1]:"a"'],
    "positions": [1],
    "conservation_error": 0.0,
    "relative_conservation_error": 0.0,
    "timings": {},
    "scores": {"dtype": "float32", "shape": [1, 2], "encoding": "list", "data": [[0.5, 1.5]]},
}
MODEL = {
    "object": "model",
    "id": "m",
    "architecture": "LlamaForCausalLM",
    "family": "llama",
    **dict.fromkeys(["num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"], 2),
    "intermediate_size": 8,
    "vocab_size": 10,
    "dtype": "float32",
    "device": "cpu",
}
#: The answer of the scripted service on each path.
REPLIES: dict[str, Any] = {
    "/v1/attributions": ATTRIBUTION,
    "/v1/generate": GENERATION,
    "/v1/tokenize": {"input_ids": [1, 5], "tokens": ["<s>", "a"], "num_tokens": 2},
    "/v1/next_tokens": NEXT_TOKENS,
    "/v1/model": MODEL,
    "/health": {"status": "ok"},
    "/ready": {"status": "ready", "model": "m"},
    "/metrics": "# HELP depass_requests_total Requests.\n",
}
#: The positional arguments of each route's method.
ARGS: dict[str, tuple[Any, ...]] = {
    "attribute": ("a",),
    "generate": ("a",),
    "tokenize": ("a",),
    "next_tokens": ("a",),
}


def service(request: httpx.Request) -> httpx.Response:
    reply = REPLIES[request.url.path]
    if isinstance(reply, str):
        return httpx.Response(200, text=reply)
    return httpx.Response(200, json=reply)


def body(request: httpx.Request) -> dict[str, Any]:
    sent: dict[str, Any] = json.loads(request.content)
    return sent


def test_typed_fields_left_out_or_none_take_the_service_default() -> None:
    script = Script(httpx.Response(200, json=ATTRIBUTION))
    client = RecordingClient(script)
    client.attribute("a", granularity="head", start_layer=[1, 2], end_layer=None, top_k=None)
    sent = body(script.requests[0])
    assert sent["granularity"] == "head" and sent["start_layer"] == [1, 2]
    assert "end_layer" not in sent and "top_k" not in sent and "targets" not in sent
    assert sent["array_encoding"] in ("zstd+base64", "base64")  # what the SDK can decode
    client.attribute(input_ids=[1, 5], array_encoding=None)
    assert "prompt" not in body(script.requests[1]) and body(script.requests[1])["input_ids"]


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_route_takes_a_timeout_and_extra_headers(name: str) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return service(request)

    client = RecordingClient(Script(), timeout=5.0, default_headers={"X-A": "1", "X-B": "1"})
    client._http = httpx.Client(transport=httpx.MockTransport(record))
    method = getattr(client, name)
    method(*ARGS.get(name, ()), timeout=1.5, extra_headers={"X-B": "2", "X-C": "3"})
    method(*ARGS.get(name, ()))
    method(*ARGS.get(name, ()), timeout=None)
    given, default, unlimited = seen
    assert (given.method, given.url.path) == ROUTES[name][:2]
    assert [given.headers[h] for h in ("x-a", "x-b", "x-c")] == ["1", "2", "3"]
    assert default.headers["x-b"] == "1" and "x-c" not in default.headers
    assert given.extensions["timeout"] == httpx.Timeout(1.5).as_dict()
    assert default.extensions["timeout"] == httpx.Timeout(5.0).as_dict()
    assert unlimited.extensions["timeout"] == httpx.Timeout(None).as_dict()


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(ROUTES))
async def test_the_async_routes_take_them_too(name: str) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return service(request)

    client = RecordingAsyncClient(Script(), default_headers={"X-A": "1"})
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    await getattr(client, name)(*ARGS.get(name, ()), timeout=2.0, extra_headers={"X-A": "2"})
    assert seen[0].headers["x-a"] == "2"
    assert seen[0].extensions["timeout"] == httpx.Timeout(2.0).as_dict()


def test_next_tokens_is_typed() -> None:
    script = Script(httpx.Response(200, json=NEXT_TOKENS))
    result = RecordingClient(script).next_tokens("a", positions=[-1], top_k=2)
    sent = body(script.requests[0])
    assert sent == {"prompt": "a", "positions": [-1], "top_k": 2}  # no array options
    assert result.positions == [1] and result.model == "m"
    assert result.predictions[0][0] == dc.NextToken(id=7, token="b", logit=3.5, probability=0.75)
    lines = result.table().splitlines()
    assert lines[0] == "after position 1 'a'" and lines[2].split()[:4] == ["1", "'b'", "7", "0.75"]


@pytest.mark.anyio
async def test_async_next_tokens() -> None:
    script = Script(httpx.Response(200, json=NEXT_TOKENS))
    result = await RecordingAsyncClient(script).next_tokens(input_ids=[1, 5])
    assert body(script.requests[0]) == {"input_ids": [1, 5]}
    assert [c.id for c in result.predictions[0]] == [7, 9]


def test_wait_until_ready_polls_until_ready_then_gives_up() -> None:
    not_ready = httpx.Response(503)
    script = Script(not_ready, not_ready, httpx.Response(200, json=REPLIES["/ready"]))
    client = RecordingClient(script)
    client.wait_until_ready(timeout_s=60, interval_s=0.5)
    assert len(script.requests) == 3 and client.sleeps == [0.5, 0.5]
    never = RecordingClient(Script(not_ready))
    with pytest.raises(dc.DePassError, match="not ready within 0 s"):
        never.wait_until_ready(timeout_s=0)
    assert never.sleeps == []


@pytest.mark.anyio
async def test_async_wait_until_ready() -> None:
    not_ready = httpx.Response(503)
    script = Script(not_ready, httpx.ConnectError("loading"), httpx.Response(200))
    client = RecordingAsyncClient(script)
    await client.wait_until_ready(timeout_s=60, interval_s=0.25)
    assert len(script.requests) == 3 and client.sleeps == [0.25, 0.25]
    never = RecordingAsyncClient(Script(not_ready))
    with pytest.raises(dc.DePassError, match="was not ready within 0 s"):
        await never.wait_until_ready(timeout_s=0)


def test_the_command_line_prints_next_tokens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from depass_client import cli

    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return service(request)

    def client(**options: Any) -> dc.Client:
        return dc.Client(http_client=httpx.Client(transport=httpx.MockTransport(record)))

    monkeypatch.setattr(cli, "Client", client)
    assert cli.main(["next-tokens", "a", "--positions", "1", "--top-k", "2"]) == 0
    assert body(seen[0]) == {"prompt": "a", "positions": [1], "top_k": 2}
    assert capsys.readouterr().out.splitlines()[0] == "after position 1 'a'"
    assert cli.main(["next-tokens", "a", "--json"]) == 0
    assert body(seen[1]) == {"prompt": "a"}
    printed = json.loads(capsys.readouterr().out)
    assert printed["predictions"][0][0] == {
        "id": 7,
        "token": "b",
        "logit": 3.5,
        "probability": 0.75,
    }
