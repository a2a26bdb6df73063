"""Read the output of ``depass-batch``: Parquet shards of rows into :class:`Attribution`.

A row holds the request's ``id``, its ``error`` (null when it ran), the ``strategy`` that
ran and the result's fields under the names of ``POST /v1/attributions``; its arrays are
nested lists that always carry the leading layer axis (length 1 when ``layers`` is
null), which :meth:`Attribution.from_row` removes, so that a row reads back as the same
:class:`Attribution` the service would return. Needs pyarrow (``pip install pyarrow``);
the SDK imports it only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depass_client._types import Attribution


@dataclass
class BatchRow:
    """One output row: the request's id, and its attribution or its error."""

    id: str
    error: dict[str, Any] | None  # {"type", "field", "message"} when it did not run
    attribution: Attribution | None
    strategy: str | None = None


def attribution_from_row(row: dict[str, Any]) -> Attribution:
    """The :class:`Attribution` of one output row (a dict of its columns)."""
    layered = row.get("layers") is not None
    values: dict[str, Any] = {}
    for name in Attribution.__dataclass_fields__:
        if name not in row:
            continue
        value = row[name]
        if name in Attribution.ARRAYS:
            if value is not None:
                array = np.asarray(value, dtype=np.float32)
                value = array if layered else array[0]
        elif name == "timings" and value is not None:
            value = dict(value)  # Arrow's map arrives as (key, value) pairs
        values[name] = value
    return Attribution(**values)


def read_batch(path: str | os.PathLike[str]) -> list[BatchRow]:
    """Every row of a ``depass-batch`` shard, or of all shards in an output folder."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading depass-batch output needs pyarrow: pip install pyarrow") from exc
    path = Path(path)
    shards = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    out: list[BatchRow] = []
    for shard in shards:
        for row in pq.read_table(shard).to_pylist():
            failed = row.get("error") is not None
            out.append(
                BatchRow(
                    id=row["id"],
                    error=row.get("error"),
                    attribution=None if failed else attribution_from_row(row),
                    strategy=row.get("strategy"),
                )
            )
    return out
