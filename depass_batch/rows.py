"""One output row per request: its Arrow schema, derived from the engine's dataclasses.

A row is the request's ``id``, its ``error`` (null when it ran; else the error's type, the
field at fault and the message), the ``request`` as given (JSON text), the ``strategy``
that ran, and every field of :class:`engine.AttributionResult` under its own name: the
columns follow the dataclass, so a field the engine gains is a column here with nothing
edited. Arrow types come from the fields' type hints (lists, dicts, optionals, literals);
tensors are nested lists of float32.

Tensors always carry the leading layer axis: a result without one (``layers`` null) has
it with length 1, so that each tensor column has one nesting depth in every shard
(Arrow and Parquet need one type per column). :data:`TENSOR_RANKS` holds each tensor's
rank without that axis; a test keeps its keys equal to the result's tensor fields.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from engine import AttributionRequest, AttributionResult, RequestError

#: Rank of each tensor field of the result without the layer axis (engine/result.py):
#: scores (P, M, T), remainder_scores (P, T), states (P, M, D), remainder (P, D),
#: logits and capped_logits (P, T).
TENSOR_RANKS: dict[str, int] = {
    "states": 3,
    "remainder": 2,
    "scores": 3,
    "remainder_scores": 2,
    "logits": 2,
    "capped_logits": 2,
}
#: The strategy a result ran with when the engine does not say (engines before
#: strategies had the forward propagation only).
DEFAULT_STRATEGY = "forward"
ERROR_TYPE = pa.struct([("type", pa.string()), ("field", pa.string()), ("message", pa.string())])
#: The column naming each row (the input's ``id``, or the row's index in the input).
ID_FIELD = "id"


def _arrow_type(hint: Any) -> pa.DataType | None:
    """The Arrow type of a plain type hint, or None when it has no faithful one."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return _arrow_type(members[0]) if len(members) == 1 else None
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return _arrow_type(kinds.pop()) if len(kinds) == 1 else None
    if origin is list:
        item = _arrow_type(args[0])
        return None if item is None else pa.list_(item)
    if origin is dict and args[0] is str:
        value = _arrow_type(args[1])
        return None if value is None else pa.map_(pa.string(), value)
    scalars = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
    return scalars.get(hint)


def _tensor_type(rank: int) -> pa.DataType:
    kind: pa.DataType = pa.float32()
    for _ in range(rank + 1):  # + the layer axis
        kind = pa.list_(kind)
    return kind


def result_columns() -> dict[str, pa.DataType]:
    """Arrow type of each :class:`engine.AttributionResult` field (JSON text where the
    hint has no faithful Arrow type), in the dataclass's order."""
    hints = typing.get_type_hints(AttributionResult)
    columns: dict[str, pa.DataType] = {}
    for item in dataclasses.fields(AttributionResult):
        hint = hints[item.name]
        if _is_tensor(hint):
            if item.name not in TENSOR_RANKS:
                raise TypeError(f"depass_batch.rows.TENSOR_RANKS lacks the tensor {item.name!r}")
            columns[item.name] = _tensor_type(TENSOR_RANKS[item.name])
        else:
            columns[item.name] = _arrow_type(hint) or pa.string()
    return columns


def _is_tensor(hint: Any) -> bool:
    return hint is torch.Tensor or torch.Tensor in typing.get_args(hint)


RESULT_COLUMNS = result_columns()


def row_schema() -> pa.Schema:
    """The schema of every output shard: id, error, request, strategy, then the result."""
    columns = {
        ID_FIELD: pa.string(),
        "error": ERROR_TYPE,
        "request": pa.string(),
        "strategy": pa.string(),
    }
    for name, kind in RESULT_COLUMNS.items():
        columns.setdefault(name, kind)  # a result field named strategy keeps its place
    return pa.schema(list(columns.items()))


SCHEMA = row_schema()
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(AttributionRequest))


# ---------------------------------------------------------------------------- requests


def parse_request(fields: Mapping[str, Any]) -> AttributionRequest:
    """The engine's request from a row's fields (its ``id`` left out).

    Raises:
        engine.RequestError: a field that :class:`engine.AttributionRequest` does not
            have, or the request's own checks (it names the field).
    """
    unknown = sorted(set(fields) - set(REQUEST_FIELDS) - {ID_FIELD})
    if unknown:
        raise RequestError(unknown[0], f"not a request field ({', '.join(REQUEST_FIELDS)})")
    given = {k: v for k, v in fields.items() if k in REQUEST_FIELDS and v is not None}
    return AttributionRequest(**given)


def error_of(exc: BaseException) -> dict[str, Any]:
    """The ``error`` column of a failed row: the exception's type, field and message."""
    return {
        "type": type(exc).__name__,
        "field": getattr(exc, "field", None),
        "message": getattr(exc, "message", None) or str(exc) or type(exc).__name__,
    }


def error_row(row_id: str, request: str, exc: BaseException) -> dict[str, Any]:
    """The row of a request that did not run: its id, request and error; the rest null."""
    return {ID_FIELD: row_id, "error": error_of(exc), "request": request}


def result_row(row_id: str, request: str, result: AttributionResult) -> dict[str, Any]:
    """The row of a result: every field of it, tensors as nested float32 lists."""
    row: dict[str, Any] = {ID_FIELD: row_id, "error": None, "request": request}
    row["strategy"] = getattr(result, "strategy", DEFAULT_STRATEGY)
    for item in dataclasses.fields(result):
        value = getattr(result, item.name)
        if item.name in TENSOR_RANKS:
            row[item.name] = _tensor_lists(item.name, value, result.layers is not None)
        elif RESULT_COLUMNS.get(item.name) == pa.string() and not isinstance(value, str):
            row[item.name] = None if value is None else json.dumps(value)
        elif isinstance(value, dict):
            row[item.name] = list(value.items())
        else:
            row[item.name] = value
    return row


def _tensor_lists(name: str, value: torch.Tensor | None, layered: bool) -> list | None:
    if value is None:
        return None
    array = value.detach().to("cpu", torch.float32).numpy()
    if not layered:
        array = array[np.newaxis]
    if array.ndim != TENSOR_RANKS[name] + 1:
        raise ValueError(
            f"{name}: expected rank {TENSOR_RANKS[name]} (+ layers), got {value.shape}"
        )
    return array.tolist()


def table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as one table of :data:`SCHEMA` (missing columns null)."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)
