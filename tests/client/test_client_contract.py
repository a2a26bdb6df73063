"""The SDK against the service's OpenAPI document: every operation has a sync and an
async method with the same parameters, the request fields are the request schemas' (names,
JSON types, choices) and the results' fields are the response schemas'.

The SDK imports neither the service nor pydantic: these tests are what keeps its typed
keyword arguments (``depass_client._params``) and results (``depass_client._types``)
equal to the service, from the document the service itself publishes.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import numpy as np
import pytest

from depass_client import AsyncClient, Client, _params, _types
from depass_client._base import ROUTES
from service import create_app
from tests.service.conftest import settings

DOC: dict[str, Any] = create_app(settings()).openapi()
#: Parameters of every method that are not request fields.
OPTIONS = ("self", "binary", "timeout", "extra_headers")
#: The public methods that are not operations of the service.
HELPERS = {"attribute_many", "wait_until_ready", "close"}


def operations() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in DOC["paths"].items() for m in ops}


def operation(name: str) -> dict[str, Any]:
    route = ROUTES[name]
    op: dict[str, Any] = DOC["paths"][route.path][route.method.lower()]
    return op


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def public(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


# ---------------------------------------------------------------------------- JSON types

_JSON = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def sdk_types(annotation: Any) -> set[str]:
    """The JSON types a Python annotation stands for; arrays with their items'
    (``array[integer|string]``); a numpy array travels as an encoded array object."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(sdk_types(a) for a in get_args(annotation)))
    if origin is Literal:
        return {_JSON[type(v)] for v in get_args(annotation)}
    if annotation in _JSON:
        return {_JSON[annotation]}
    if annotation is Any:
        return {"any"}
    if origin in (list, collections.abc.Sequence):
        (item,) = get_args(annotation) or (Any,)
        return {f"array[{'|'.join(sorted(sdk_types(item)))}]"}
    if origin in (dict, collections.abc.Mapping) or is_typeddict(annotation):
        return {"object"}
    if annotation is np.ndarray or dataclasses.is_dataclass(annotation):
        return {"object"}
    raise AssertionError(f"no JSON type for {annotation!r}")


def schema_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema allows, in :func:`sdk_types`' words."""
    schema = resolve(schema)
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(*(schema_types(s) for s in schema.get("anyOf", schema.get("oneOf"))))
    kind = schema.get("type")
    if kind is None:
        return {"any"}
    if kind == "array":
        return {f"array[{'|'.join(sorted(schema_types(schema.get('items', {}))))}]"}
    return set(kind) if isinstance(kind, list) else {kind}


def sdk_choices(annotation: Any) -> set[Any]:
    """Every Literal value inside an annotation."""
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    return set().union(*(sdk_choices(a) for a in get_args(annotation)))


def schema_choices(schema: dict[str, Any]) -> set[Any]:
    """Every enum or const value inside a schema."""
    schema = resolve(schema)
    found = set(schema.get("enum", []))
    if "const" in schema:
        found.add(schema["const"])
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            found |= schema_choices(sub)
    if "items" in schema:
        found |= schema_choices(schema["items"])
    return found


# ---------------------------------------------------------------------------- methods


def test_every_operation_has_a_sync_and_an_async_method() -> None:
    assert {(r.method, r.path) for r in ROUTES.values()} == operations()
    for name in ROUTES:
        assert callable(getattr(Client, name, None)), f"Client has no {name}()"
        assert not inspect.iscoroutinefunction(getattr(Client, name))
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name, None)), (
            f"AsyncClient.{name} is missing or not async"
        )


def test_both_clients_have_the_same_methods_and_parameters() -> None:
    assert public(Client) == public(AsyncClient) == set(ROUTES) | HELPERS
    for name in public(Client):
        sync, aio = (
            inspect.signature(getattr(Client, name)),
            inspect.signature(getattr(AsyncClient, name)),
        )
        assert sync.parameters == aio.parameters, name
        if name in ROUTES or name == "attribute_many":
            for option in ("timeout", "extra_headers"):
                assert sync.parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, name


def request_fields(name: str) -> dict[str, Any]:
    """The request fields a method takes, by name: its own parameters (``prompt``) and
    the keys of the TypedDict its ``**fields`` unpacks."""
    parameters = inspect.signature(getattr(Client, name)).parameters
    hints: dict[str, Any] = {}
    for parameter in parameters.values():
        if parameter.name in OPTIONS:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            match = re.fullmatch(r"Unpack\[(\w+)\]", str(parameter.annotation))
            assert match, f"{name}: **{parameter.name} is not an Unpack[TypedDict]"
            hints |= get_type_hints(getattr(_params, match.group(1)))
        else:
            # a string under postponed annotations, e.g. "str | None"
            hints[parameter.name] = eval(parameter.annotation, vars(_params))
    return hints


@pytest.mark.parametrize("name", sorted(n for n in ROUTES if "requestBody" in operation(n)))
def test_request_fields_are_the_request_schema(name: str) -> None:
    body = operation(name)["requestBody"]["content"]["application/json"]["schema"]
    properties = resolve(body)["properties"]
    fields = request_fields(name)
    assert set(fields) == set(properties), f"{name}: the SDK's fields differ from the schema's"
    for field, annotation in fields.items():
        schema = properties[field]
        # every SDK field may be None (the service's default); the service decides
        want, got = schema_types(schema) - {"null"}, sdk_types(annotation) - {"null"}
        assert got == want, f"{name}.{field}: the SDK takes {got}, the service {want}"
        assert sdk_choices(annotation) == schema_choices(schema), f"{name}.{field}"


def results() -> list[tuple[str, type]]:
    """Each operation whose method returns a typed result, and that result's class."""
    found = []
    for name in ROUTES:
        returned = inspect.signature(getattr(Client, name)).return_annotation
        cls = getattr(_types, str(returned), None)
        if cls is not None:
            found.append((name, cls))
    return found


def check_result(cls: type, schema: dict[str, Any], where: str) -> None:
    """A result class against its response schema, nested results included."""
    schema = resolve(schema)
    properties = {k: v for k, v in schema["properties"].items() if k != "object"}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    assert set(fields) == set(properties), f"{where}: the SDK's fields differ from the schema's"
    hints = get_type_hints(cls)
    required = {
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert required <= set(schema.get("required", [])), f"{where}: the SDK needs optional fields"
    for name in fields:
        annotation = hints[name]
        want, got = schema_types(properties[name]), sdk_types(annotation)
        if "null" in want:
            assert "null" in got, f"{where}.{name} may be null"
        assert got - {"null"} == want - {"null"}, f"{where}.{name}: {got} against {want}"
        choices = sdk_choices(annotation)
        assert not choices or choices == schema_choices(properties[name]), f"{where}.{name}"
        inner, sub = annotation, properties[name]
        while get_origin(inner) in (list, collections.abc.Sequence):
            inner, sub = get_args(inner)[0], resolve(sub)["items"]
        if dataclasses.is_dataclass(inner):
            check_result(inner, sub, f"{where}.{name}")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "cls"), results(), ids=[n for n, _ in results()])
def test_result_fields_are_the_response_schema(name: str, cls: type) -> None:
    ok = operation(name)["responses"]["200"]["content"]["application/json"]["schema"]
    check_result(cls, ok, cls.__name__)


def test_every_typed_result_is_checked() -> None:
    assert {cls.__name__ for _, cls in results()} == {
        "Attribution",
        "Generation",
        "NextTokens",
        "Tokenization",
        "ModelCard",
    }
