"""Property test: no request built from the request schema's own fields breaks the engine
or the service.

Requests are drawn from the JSON schema of ``POST /v1/attributions`` (the fields of
:class:`engine.AttributionRequest`, so that a new field is drawn as soon as it exists),
with values around each field's limits: duplicates, empty lists, extreme and non-finite
numbers, blank and special-token-only prompts, every granularity with its own fields.
The engine may refuse one only with :class:`RequestError` (or its
:class:`MemoryBudgetError`); the service may answer only 200 or a 4xx with the error
envelope.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import AttributionRequest, DePassEngine, RequestError
from engine.granularity import GRANULARITY_KINDS
from engine.testing import tiny_model, word_tokenizer
from service.endpoints.attributions.protocol import AttributionBody
from tests.service.conftest import running

#: Examples per test: enough to meet every granularity and field many times, small
#: enough for CI (the two tests take a few seconds).
EXAMPLES = 60
#: The engine test is cheaper per example (no app): more of them.
ENGINE_EXAMPLES = 200
SCHEMA = AttributionBody.model_json_schema()
DEFS = SCHEMA.get("$defs", {})
#: The engine request's fields, as the HTTP schema describes them.
ENGINE_FIELDS = [f.name for f in dataclasses.fields(AttributionRequest)]
INPUTS = ("prompt", "input_ids", "messages")

# Values around the limits of the tiny Llama (2 layers, 4 heads, D 32, 48 neurons, 96 ids).
INTS = [-(2**63), -7, -2, -1, 0, 1, 2, 3, 4, 5, 6, 47, 48, 95, 96, 2**31]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-39, 1e-7, 1e-6, 0.1, 1.0, 1e30]
TEXTS = ["", " ", "   ", "\n", "<s>", "the", "the capital of France is", "France", "qqqzzz", "é"]
VALID_TEXTS = ["the capital of France is", "France is", "the"]


def mostly(valid: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` seven times in eight, else ``edge``: enough requests get through the
    checks to run the engine, and every check still meets its edges."""
    return st.integers(0, 7).flatmap(lambda i: edge if i == 7 else valid)


def values(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of one JSON schema fragment, drawn around its limits."""
    if "$ref" in schema:
        return values(DEFS[schema["$ref"].rsplit("/", 1)[-1]], depth)
    if "anyOf" in schema:
        # lists twice as often as the other members: they have more edges (empty,
        # repeated items)
        members = [values(s, depth) for s in schema["anyOf"]]
        lists = [
            m for s, m in zip(schema["anyOf"], members, strict=True) if s.get("type") == "array"
        ]
        return st.sampled_from(members + lists).flatmap(lambda member: member)
    if "enum" in schema:
        return mostly(st.sampled_from(schema["enum"]), st.just("unknown"))
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63)
        bounds = [b + d for b in (low, high) if abs(b) < 2**62 for d in (-1, 0, 1)]
        small = [v for v in (0, 1) if low <= v <= high] or [low]
        return mostly(st.sampled_from(small), st.sampled_from(sorted({*INTS, *bounds})))
    if kind == "number":
        return mostly(st.sampled_from([0.1, 0.5, 1.0]), st.sampled_from(FLOATS))
    if kind == "string":
        return mostly(st.sampled_from(VALID_TEXTS), st.sampled_from(TEXTS))
    if kind == "array" and depth < 3:
        item = values(schema.get("items", {}), depth + 1)
        some = st.lists(item, min_size=1, max_size=4)
        edges = st.just([]) | some.map(lambda xs: xs + xs[:1])  # empty, a repeated item
        return mostly(some, edges)
    if kind == "object" and "properties" in schema:
        props = schema["properties"]
        return st.fixed_dictionaries({k: values(v, depth + 1) for k, v in props.items()})
    return st.sampled_from([0, "x", None])


def subspaces() -> st.SearchStrategy[list]:
    """(K, N, D) nested lists, around the shapes the tiny model takes (N = 2, 3 or 6
    tokens of the valid prompts, D = 32)."""
    shape = st.tuples(
        mostly(st.sampled_from([1, 2]), st.just(0)),
        st.sampled_from([2, 3, 6, 1]),
        mostly(st.just(32), st.just(31)),
    )
    fill = st.sampled_from([0.0, 0.5, -3.0, math.nan])
    return st.builds(
        lambda s, v: [[[v] * s[2] for _ in range(s[1])] for _ in range(s[0])], shape, fill
    )


#: The fields that belong to one granularity.
OWNED = {name for kind in GRANULARITY_KINDS.values() for name in kind.fields}
FIELD_VALUES = {
    name: subspaces() if name == "subspace" else values(schema)
    for name, schema in SCHEMA["properties"].items()
}


@st.composite
def request_fields(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    """A request over ``names``: one input (sometimes two), a granularity, the fields
    that granularity needs, and any others."""
    granularity = draw(FIELD_VALUES["granularity"])
    kind = GRANULARITY_KINDS.get(granularity)
    fields: dict[str, Any] = {"granularity": granularity}
    inputs = mostly(st.just(["prompt"]), st.lists(st.sampled_from(INPUTS), max_size=2, unique=True))
    for name in draw(inputs):
        fields[name] = draw(mostly(FIELD_VALUES[name].filter(_given), FIELD_VALUES[name]))
    owned = kind.fields if kind is not None else ()
    others = [n for n in names if n not in (*INPUTS, "granularity")]
    for name in others:
        # the granularity's own fields often, shared ones half as often, the fields of
        # other granularities now and then
        chance = 6 if name in owned else 1 if name in OWNED else 5
        if kind is not None and name in kind.required:
            fields[name] = draw(mostly(FIELD_VALUES[name].filter(_given), FIELD_VALUES[name]))
        elif draw(st.integers(0, 9)) < chance:
            fields[name] = draw(FIELD_VALUES[name])
    return fields


def _given(value: Any) -> bool:
    return value is not None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def engine() -> DePassEngine:
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer())


@settings(
    max_examples=ENGINE_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(fields=request_fields([n for n in ENGINE_FIELDS if n in SCHEMA["properties"]]))
def test_the_engine_raises_only_request_errors(engine: DePassEngine, fields: dict) -> None:
    try:
        result = engine.attribute(AttributionRequest(**fields))
    except RequestError as exc:  # MemoryBudgetError is one
        assert exc.field and str(exc).startswith(exc.field), exc
        return
    assert result.conservation_error < 1e-3 or not math.isfinite(result.conservation_error)


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    """The HTTP body of a drawn request: a subspace as a list-encoded array object."""
    body = dict(fields)
    subspace = body.get("subspace")
    if isinstance(subspace, list):
        k = len(subspace)
        n = len(subspace[0]) if k else 0
        d = len(subspace[0][0]) if n else 0
        body["subspace"] = {
            "dtype": "float32",
            "shape": [k, n, d],
            "encoding": "list",
            "data": subspace,
        }
    return body


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(fields=request_fields(list(SCHEMA["properties"])))
@pytest.mark.anyio
async def test_the_service_answers_only_200_or_4xx(engine: DePassEngine, fields: dict) -> None:
    async with running(engine, raise_app_exceptions=False) as (_, client):
        reply = await client.post(
            "/v1/attributions",
            content=json.dumps(_body(fields)),  # NaN and Infinity as JSON literals
            headers={"content-type": "application/json"},
        )
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, reply.text
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", error
