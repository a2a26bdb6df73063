"""One engine answering batches of rows: the same code in-process and in each Ray actor.

:class:`AttributionWorker` loads the model once and turns a batch of input rows (``id``
and the request as JSON text) into output rows (:mod:`depass_batch.rows`). The rows the
engine accepts run together through :meth:`engine.DePassEngine.attribute_many` (small
compatible ones as one padded batch); a row that cannot run becomes an error row and the
batch goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from depass_batch import rows
from engine import AttributionRequest, DePassEngine, RequestError


@dataclass(frozen=True)
class EngineSpec:
    """How each worker loads its engine (the arguments of
    :meth:`engine.DePassEngine.from_pretrained`) and how many threads torch may use."""

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> DePassEngine:
        """The engine, with torch's threads set first (``None``: torch's default)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return DePassEngine.from_pretrained(
            self.model, device=self.device, dtype=self.dtype, **self.engine_kwargs
        )


class AttributionWorker:
    """Answers batches of input rows with one engine (a Ray Data callable class)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = spec.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Input rows (``id``, ``request``) in, output rows of :data:`rows.SCHEMA` out."""
        items = batch.select([rows.ID_FIELD, "request"]).to_pylist()
        return rows.table(self.attribute_rows(items))

    def attribute_rows(self, items: list[dict[str, str]]) -> list[dict[str, Any]]:
        """One output row per input row, in order."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        ready: list[tuple[int, AttributionRequest]] = []
        for i, item in enumerate(items):
            try:
                request = rows.parse_request(_fields(item["request"]))
                self.engine.plan(request)  # the model's checks, no model work
            except Exception as exc:  # every refusal becomes the row's error
                out[i] = rows.error_row(item[rows.ID_FIELD], item["request"], exc)
            else:
                ready.append((i, request))
        for i, row in self._run(items, ready):
            out[i] = row
        return [row for row in out if row is not None]

    def _run(
        self, items: list[dict[str, str]], ready: list[tuple[int, AttributionRequest]]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Run the planned requests together; if the batch fails, each alone, so that
        only the requests that fail by themselves become error rows."""
        if not ready:
            return []
        try:
            return self._rows(items, ready)
        except Exception:  # retried one by one below
            pass
        done: list[tuple[int, dict[str, Any]]] = []
        for i, request in ready:
            try:
                done.extend(self._rows(items, [(i, request)]))
            except Exception as exc:  # its own failure becomes its row
                done.append((i, rows.error_row(items[i][rows.ID_FIELD], items[i]["request"], exc)))
        return done

    def _rows(
        self, items: list[dict[str, str]], ready: list[tuple[int, AttributionRequest]]
    ) -> list[tuple[int, dict[str, Any]]]:
        clock = time.perf_counter()
        results = self.engine.attribute_many([request for _, request in ready])
        per_row = (time.perf_counter() - clock) / len(ready)
        done = []
        for (i, _), result in zip(ready, results, strict=True):
            # batch_size: the requests run together; row_s: the batch's time per row.
            result.timings = {**result.timings, "batch_size": len(ready), "row_s": per_row}
            item = items[i]
            done.append((i, rows.result_row(item[rows.ID_FIELD], item["request"], result)))
        return done


def _fields(text: str) -> dict[str, Any]:
    """A row's request fields (an input line that was not an object sits in 'request')."""
    value = json.loads(text)
    if set(value) == {"request"} and not isinstance(value["request"], dict):
        raise RequestError("request", "each input row must be a JSON object of request fields")
    return value
