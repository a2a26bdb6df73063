"""What a body field accepts, in words, from the JSON schema of the field's model.

A refused field reads as one sentence saying what was wrong and what is accepted
(``"start_layer: -1 is not accepted; expected an integer of at least 0, or a list of
integers of at least 0"``), whichever of a union's members pydantic tried: the accepted
part comes from the schema the OpenAPI document publishes, so it cannot drift from it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

#: How deep object schemas are spelled out (an array object inside a list stays short).
MAX_DEPTH = 2


def accepted(model: type[BaseModel], field: str) -> str | None:
    """What ``field`` of ``model`` accepts, in words; None for an unknown field."""
    schema = model.model_json_schema()
    prop = schema.get("properties", {}).get(field)
    if prop is None:
        return None
    return describe(prop, schema.get("$defs", {}))


def describe(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> str:
    """One JSON schema fragment in words (``an integer of at least 0``)."""
    if "$ref" in schema:
        return describe(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth)
    if "anyOf" in schema:
        options = [describe(s, defs, depth) for s in schema["anyOf"]]
        return ", or ".join(dict.fromkeys(options))
    if "enum" in schema:
        return _one_of(schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return "null"
    if kind == "boolean":
        return "true or false"
    if kind in ("integer", "number"):
        name = "an integer" if kind == "integer" else "a finite number"
        return name + _bounds(schema)
    if kind == "string":
        return "a non-empty string" if schema.get("minLength", 0) > 0 else "a string"
    if kind == "array":
        items = schema.get("items")
        return "a list" if items is None else f"a list of {_plural(describe(items, defs, depth))}"
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if depth >= MAX_DEPTH or not props:
            return "an object"
        parts = [f"{name} ({describe(p, defs, depth + 1)})" for name, p in props.items()]
        return "an object with " + ", ".join(parts)
    return "a value"


def shown(value: Any, limit: int = 60) -> str:
    """A refused value as JSON, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounds(schema: dict[str, Any]) -> str:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    strict_low, strict_high = "exclusiveMinimum" in schema, "exclusiveMaximum" in schema
    words = []
    if low is not None:
        words.append(f"over {low:g}" if strict_low else f"of at least {low:g}")
    if high is not None:
        words.append(f"under {high:g}" if strict_high else f"of at most {high:g}")
    return (" " + " and ".join(words)) if words else ""


def _one_of(values: list[Any]) -> str:
    shown_values = [json.dumps(v) for v in values]
    if len(shown_values) == 1:
        return shown_values[0]
    return "one of " + ", ".join(shown_values)


def _plural(phrase: str) -> str:
    """``an integer of at least 0`` -> ``integers of at least 0`` (the first noun)."""
    if ", or " in phrase:
        return " or ".join(_plural(part) for part in phrase.split(", or "))
    if phrase.startswith("one of "):
        head, _, last = phrase.removeprefix("one of ").rpartition(", ")
        return f"{head} or {last}"
    for article in ("an ", "a "):
        if phrase.startswith(article):
            head, _, rest = phrase[len(article) :].partition(" ")
            if head in ("finite", "non-empty"):
                noun, _, tail = rest.partition(" ")
                return f"{head} {noun}s" + (f" {tail}" if tail else "")
            return f"{head}s" + (f" {rest}" if rest else "")
    return "items each " + phrase
