"""Hostile input, authentication and information hygiene, in-process (ASGI).

Every input a client can send gets a 4xx with the one error envelope: never a 500, a hang
or a dead worker, and never any model work. The API key is checked before the body is
read; errors never echo the key or a stack trace; arrays are never unpickled.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from fastapi.testclient import TestClient

from engine import DePassEngine
from service import create_app
from service.errors import NonFiniteResultError
from service.middleware import bearer_token, key_matches
from service.routing import MAX_JSON_DEPTH
from service.serving import MAX_CHARS_PER_TOKEN, Payload, load_engine, require_finite
from service.settings import Settings
from tests.service.conftest import PROMPT, running, settings
from tests.service.support import assert_envelope, attribution_scope

pytestmark = pytest.mark.anyio

JSON = "application/json"
KEY = "s3cret-key-7f1e9a"


def nested(depth: int) -> bytes:
    return b'{"prompt": "the", "targets": ' + b"[" * depth + b"]" * depth + b"}"


A, G, T = "/v1/attributions", "/v1/generate", "/v1/tokenize"
BIG = b"1" + b"0" * 40

#: (route, JSON body, status, code)
BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    (A, b'{"prompt": ', 400, "invalid_json"),  # truncated
    (A, b'{"prompt": "a"} x', 400, "invalid_json"),  # trailing garbage
    (G, b"{'prompt': 'a'}", 400, "invalid_json"),  # single quotes
    (A, b'{"prompt": "caf\xe9"}', 400, "invalid_json"),  # Latin-1, not UTF-8
    (T, '{"prompt": "a"}'.encode("utf-16"), 400, "invalid_json"),
    (A, b'{"prompt": "\\ud800 the"}', 400, "invalid_json"),  # lone surrogates
    (A, b'{"\\udfff": 1}', 400, "invalid_json"),
    (A, b'{"prompt": "the", "targets": ["\\udbff"]}', 400, "invalid_json"),
    (T, b'{"prompt": "\\ud83d"}', 400, "invalid_json"),
    (A, nested(40), 400, "invalid_json"),
    (A, nested(100_000), 400, "invalid_json"),
    (A, b'{"input_ids": [1' + b"0" * 5000 + b"]}", 400, "invalid_json"),  # 5001 digits
    (A, b'{"prompt": "the", "temperature": NaN}', 422, "invalid_field"),
    (G, b'{"prompt": "the", "top_p": Infinity}', 422, "invalid_field"),
    (A, b'{"prompt": "the", "positions": [-Infinity]}', 422, "invalid_field"),
    (A, b'{"prompt": "the", "start_layer": 1e999}', 422, "invalid_field"),
    (G, b'{"input_ids": [' + BIG + b"]}", 422, "invalid_field"),
    (A, b'{"prompt": "the", "positions": [-' + BIG + b"]}", 422, "invalid_field"),
    (
        A,
        b'{"prompt": "the", "granularity": "neuron", "neurons": [' + BIG + b"]}",
        422,
        "invalid_field",
    ),
    (G, b'{"prompt": "the", "max_new_tokens": ' + BIG + b"}", 422, "invalid_field"),
    (A, b'{"prompt": "the", "start_layer": 0.5}', 422, "invalid_field"),
    (A, b'{"prompt": "the", "start_layer": "1"}', 422, "invalid_field"),
    (A, b'{"input_ids": [true]}', 422, "invalid_field"),
    (A, b'{"prompt": "the", "ignore_bos": 1}', 422, "invalid_field"),
    (A, b"[]", 422, "invalid_field"),
    (G, b"null", 422, "invalid_field"),
    (T, b'"the"', 422, "invalid_field"),
    (A, b"5", 422, "invalid_field"),
    (A, b"", 422, "invalid_field"),
    (G, b"{}", 422, "invalid_field"),
]
#: (route, Content-Type): a JSON body that is not declared as JSON gets 415
NOT_DECLARED_JSON: list[tuple[str, str | None]] = [
    (A, "application/x-www-form-urlencoded"),
    (G, "text/plain"),
    (T, "multipart/form-data; boundary=x"),
    (A, "application/jsonx"),
    (A, None),
]
#: (method, route, status)
WRONG_ROUTES: list[tuple[str, str, int]] = [
    ("GET", A, 405),
    ("PUT", T, 405),
    ("POST", "/v1/model", 405),
    ("DELETE", "/health", 405),
    ("POST", "/metrics", 405),
    ("GET", "/v1/../../etc/passwd", 404),
]


class Counting:
    """A fault injector that only counts engine calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, operation: str) -> None:
        self.calls.append(operation)


async def test_hostile_input_gets_a_4xx_envelope_and_costs_no_model_work(
    llama_engine: DePassEngine,
) -> None:
    calls = Counting()
    async with running(llama_engine, fault_injector=calls) as (app, client):
        for path, body, status, code in BAD_BODIES:
            response = await client.post(path, content=body, headers={"content-type": JSON})
            error = assert_envelope(response, status)
            assert error["code"] == code, (path, body[:60], error)
        for path, content_type in NOT_DECLARED_JSON:
            headers = {"content-type": content_type} if content_type else {}
            response = await client.post(path, content=b'{"prompt": "the"}', headers=headers)
            assert assert_envelope(response, 415)["code"] == "unsupported_media_type"
        for method, path, status in WRONG_ROUTES:
            response = await client.request(method, path)
            error = assert_envelope(response, status)
            assert status == 404 or response.headers["allow"], (method, path)
        assert calls.calls == []  # refused before the worker
        assert app.state.serving.worker.alive  # no dead worker
        ok = await client.post("/v1/attributions", json={"prompt": PROMPT, "positions": [-1]})
        assert ok.status_code == 200 and calls.calls == ["attribute"]


async def test_json_limits_are_the_documented_ones(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        at_limit = {"prompt": "the", "targets": json.loads(nested(MAX_JSON_DEPTH - 1))["targets"]}
        response = await client.post("/v1/attributions", json=at_limit)
        assert_envelope(response, 422, "targets")  # parsed, then refused as a field
        error = assert_envelope(
            await client.post(
                "/v1/attributions", content=nested(MAX_JSON_DEPTH), headers={"content-type": JSON}
            ),
            400,
        )
        assert f"deeper than {MAX_JSON_DEPTH}" in error["message"]
        for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
            body = json.dumps({"prompt": PROMPT, "positions": [-1]})
            ok = await client.post(
                "/v1/attributions", content=body, headers={"content-type": content_type}
            )
            assert ok.status_code == 200, content_type
        # a surrogate pair is a valid character
        pair = await client.post(
            "/v1/tokenize",
            content=b'{"prompt": "the \\ud83d\\ude00"}',
            headers={"content-type": JSON},
        )
        assert pair.status_code == 200, pair.text


async def test_oversized_prompts_get_413_before_tokenizing(llama_engine: DePassEngine) -> None:
    calls = Counting()
    async with running(llama_engine, fault_injector=calls, max_input_tokens=4) as (_, client):
        long = "x" * (4 * MAX_CHARS_PER_TOKEN + 1)
        for path in ("/v1/attributions", "/v1/generate", "/v1/tokenize"):
            error = assert_envelope(await client.post(path, json={"prompt": long}), 413, "prompt")
            assert error["code"] == "input_too_long"
        assert calls.calls == []


async def test_extreme_temperatures_are_refused_or_served_finite(
    llama_engine: DePassEngine,
) -> None:
    async with running(llama_engine) as (_, client):
        for path, field in (
            ("/v1/attributions", "temperature"),
            ("/v1/generate", "split_temperature"),
        ):
            for value in (1e-7, 5e-324, 0.0, -1.0):
                response = await client.post(path, json={"prompt": PROMPT, field: value})
                assert_envelope(response, 422, field)
        smallest = await client.post(
            "/v1/attributions", json={"prompt": PROMPT, "temperature": 1e-6}
        )
        assert smallest.status_code == 200 and math.isfinite(smallest.json()["conservation_error"])
        huge = await client.post("/v1/attributions", json={"prompt": PROMPT, "temperature": 1e300})
        assert huge.status_code == 200
        # sampling: a tiny temperature is greedy, a huge one uniform; never NaN
        greedy = await client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3})
        for sampling in ({"temperature": 1e-300}, {"temperature": 1e300, "top_p": 1e-300}):
            body = {"prompt": PROMPT, "max_new_tokens": 3, "seed": 1, **sampling}
            response = await client.post("/v1/generate", json=body)
            assert response.status_code == 200, (sampling, response.text)
        tiny = await client.post(
            "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3, "temperature": 1e-300}
        )
        assert tiny.json()["generated_ids"] == greedy.json()["generated_ids"]


def test_a_non_finite_result_is_a_422_not_a_500() -> None:
    fields = {"conservation_error": float("nan"), "tokens": ["a"]}
    with pytest.raises(NonFiniteResultError, match="conservation_error"):
        require_finite(Payload(fields, {}))
    with pytest.raises(NonFiniteResultError, match="scores"):
        require_finite(Payload({}, {"scores": np.array([1.0, np.inf])}))
    require_finite(Payload({"conservation_error": 0.0}, {"scores": np.zeros(3)}))


# ---------------------------------------------------------------------------- 401


async def test_the_key_is_checked_before_the_body_is_read(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, api_key=KEY, max_body_bytes=64) as (app, client):
        sent: list[dict] = []

        async def receive() -> dict:
            raise AssertionError("the body was read before the key was checked")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = attribution_scope(
            [(b"content-type", b"application/json"), (b"content-length", b"9999")]
        )
        await app(scope, receive, send)
        assert sent[0]["status"] == 401
        assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]
        # malformed, oversized, or of the wrong type: without the key, always 401
        for body, content_type in (
            (b'{"prompt": ', JSON),
            (b"x" * 1000, JSON),
            (b"a=b", "text/plain"),
        ):
            response = await client.post(
                "/v1/attributions", content=body, headers={"content-type": content_type}
            )
            assert_envelope(response, 401)


WRONG_AUTHORIZATIONS: list[bytes] = [
    b"Bearer wrong",
    f"Bearer {KEY}x".encode(),
    f"Bearer {KEY[:-1]}".encode(),
    f"Bearer {KEY.upper()}".encode(),
    KEY.encode(),
    f"Basic {base64.b64encode(f'user:{KEY}'.encode()).decode()}".encode(),
    b"Bearer",
    b"Bearer \xff\xfe\x00",
    b"",
]


async def test_wrong_keys_get_401_and_the_right_one_passes(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, api_key=KEY) as (_, client):
        for authorization in WRONG_AUTHORIZATIONS:
            response = await client.get("/v1/model", headers={"Authorization": authorization})
            error = assert_envelope(response, 401)
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
            assert KEY not in response.text and KEY[:8] not in response.text
        for authorization in (f"Bearer {KEY}", f"bearer {KEY}", f"  Bearer   {KEY}  "):
            response = await client.get("/v1/model", headers={"Authorization": authorization})
            assert response.status_code == 200, authorization
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


def test_bearer_parsing_and_constant_time_comparison() -> None:
    assert bearer_token(b"Bearer abc") == b"abc" and bearer_token(b"BEARER  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None and bearer_token(None) is None
    assert key_matches(b"abc", b"abc")
    assert not key_matches(b"abd", b"abc") and not key_matches(b"ab", b"abc")
    assert not key_matches(None, b"abc")


async def test_metrics_can_be_protected(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, api_key=KEY, protect_metrics=True) as (_, client):
        assert_envelope(await client.get("/metrics"), 401)
        authorised = await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert authorised.status_code == 200 and "depass_requests_total" in authorised.text
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


# ---------------------------------------------------------------------------- hygiene


async def test_errors_never_echo_the_key_or_a_traceback(llama_engine: DePassEngine) -> None:
    def explode(operation: str) -> None:
        raise RuntimeError(f"boom with {KEY}\nTraceback (most recent call last): /etc/secret")

    async with running(
        llama_engine, fault_injector=explode, raise_app_exceptions=False, api_key=KEY
    ) as (_, client):
        responses = [
            await client.post(
                "/v1/attributions",
                json={"prompt": PROMPT},
                headers={"Authorization": f"Bearer {KEY}0"},
            ),
            await client.post(
                "/v1/attributions",
                json={"prompt": PROMPT},
                headers={"Authorization": f"Bearer {KEY}"},
            ),
            await client.post(
                "/v1/attributions", json={"prompt": 5}, headers={"Authorization": f"Bearer {KEY}"}
            ),
        ]
        assert [r.status_code for r in responses] == [401, 500, 422]
        for response in responses:
            assert KEY not in response.text
            assert "Traceback" not in response.text and "/etc/secret" not in response.text
            assert "boom" not in response.text
        assert responses[1].json()["error"]["message"] == "internal server error"


class _Boom:
    """A pickle that, if anything ever unpickled it, would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


async def test_pickled_arrays_are_rejected_and_never_unpickled(
    llama_engine: DePassEngine, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    payloads = [pickle.dumps(_Boom(marker)), pickle.dumps(np.ones((1, 6, 32), np.float32))]
    npy = io.BytesIO()
    np.save(npy, np.array([_Boom(marker)], dtype=object), allow_pickle=True)
    payloads.append(npy.getvalue())
    arrays: list[dict[str, Any]] = []
    for raw in payloads:
        arrays.append(
            {
                "dtype": "float32",
                "shape": [1, 6, 32],
                "encoding": "base64",
                "data": base64.b64encode(raw).decode(),
            }
        )
        packed = zstandard.ZstdCompressor().compress(raw)
        arrays.append(
            {
                "dtype": "float32",
                "shape": [1, 6, 32],
                "encoding": "zstd+base64",
                "data": base64.b64encode(packed).decode(),
            }
        )
        for encoding in ("pickle", "npy"):
            arrays.append(
                {
                    "dtype": "float32",
                    "shape": [1, 6, 32],
                    "encoding": encoding,
                    "data": base64.b64encode(raw).decode(),
                }
            )
    arrays.append({"dtype": "object", "shape": [1, 6, 32], "encoding": "base64", "data": ""})
    async with running(llama_engine) as (_, client):
        for array in arrays:
            body = {
                "prompt": PROMPT,
                "granularity": "subspace",
                "start_layer": 1,
                "subspace": array,
            }
            assert_envelope(await client.post("/v1/attributions", json=body), 422, "subspace")
    assert not marker.exists()


def test_docs_pages_can_be_turned_off(llama_engine: DePassEngine) -> None:
    with TestClient(create_app(settings(), engine=llama_engine)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 200, path
    with TestClient(create_app(settings(docs_enabled=False), engine=llama_engine)) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert assert_envelope(client.get(path), 404)["code"] == "not_found"


def test_remote_code_is_off_unless_turned_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []

    def from_pretrained(path: str, **kwargs: Any) -> None:
        seen.append(kwargs)

    monkeypatch.setattr(DePassEngine, "from_pretrained", staticmethod(from_pretrained))
    for key in [k for k in os.environ if k.startswith("DEPASS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DEPASS_MODEL", str(tmp_path))
    load_engine(Settings())
    monkeypatch.setenv("DEPASS_TRUST_REMOTE_CODE", "true")
    monkeypatch.setenv("DEPASS_TRACE_CACHE_BYTES", "1048576")
    load_engine(Settings())
    assert [s["trust_remote_code"] for s in seen] == [False, True]
    assert [s["trace_cache_bytes"] for s in seen] == [None, 1048576]


async def test_model_card_reports_the_trace_cache_limits(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        limits = (await client.get("/v1/model")).json()["limits"]
    assert limits["trace_cache_size"] == llama_engine.traces.size
    assert limits["trace_cache_bytes"] == llama_engine.traces.max_bytes
