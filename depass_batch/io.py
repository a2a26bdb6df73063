"""Input rows in, Parquet shards and a manifest out, resumable by id.

Input: a JSONL or Parquet file, or a folder of them (read in name order), one request per
row with any :class:`engine.AttributionRequest` field and an optional ``id`` (default:
the row's index in the input, so that a rerun names rows alike). Each row travels as its
``id`` and its request as JSON text, which keeps fields of mixed types (``start_layer``
as a number or a list, ``targets`` of ids and strings) intact.

Output: ``part-NNNNN.parquet`` shards of :data:`depass_batch.rows.SCHEMA`, each written
whole (to a hidden temporary name, then renamed), and ``_manifest.json`` listing them with their
row and error counts. The shards on disk are the truth: a job started again on the same
folder reads the ids they hold and skips those rows, so a killed job loses only the rows
not yet in a shard, and no row is written twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from depass_batch import rows

#: The manifest and the files being written start with "_" or ".", which Parquet readers
#: skip (``pandas.read_parquet(folder)`` reads the shards alone).
MANIFEST = "_manifest.json"
SHARD_GLOB = "part-*.parquet"
PARTIAL_GLOB = ".*.partial"
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")


def input_files(path: Path) -> list[Path]:
    """The input file, or a folder's JSONL and Parquet files in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in INPUT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} holds no {', '.join(INPUT_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def read_requests(path: Path) -> list[dict[str, str]]:
    """Every input row as ``{"id", "request"}`` (the request as JSON text).

    Raises:
        ValueError: two rows with one id (the output is keyed by id), or a JSONL line
            that is not JSON (its file and line named).
    """
    items: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for fields in _records(input_files(path)):
        index = len(items)
        given = fields.pop(rows.ID_FIELD, None)
        row_id = str(index) if given is None else str(given)
        if row_id in seen:
            raise ValueError(f"id {row_id!r} is in rows {seen[row_id]} and {index}")
        seen[row_id] = index
        items.append({rows.ID_FIELD: row_id, "request": json.dumps(fields)})
    return items


def _records(files: list[Path]) -> Iterable[dict[str, Any]]:
    for file in files:
        if file.suffix == ".parquet":
            for record in pq.read_table(file).to_pylist():
                yield {k: v for k, v in record.items() if v is not None}
            continue
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{file}:{number}: not JSON ({exc})") from None
                # A non-object line is kept (it becomes an error row naming it).
                yield record if isinstance(record, dict) else {"request": record}


def input_table(items: list[dict[str, str]]) -> pa.Table:
    """The input rows as a table (``id``, ``request``)."""
    schema = pa.schema([(rows.ID_FIELD, pa.string()), ("request", pa.string())])
    return pa.Table.from_pylist(items, schema=schema)


class ShardWriter:
    """Writes output rows to whole Parquet shards of about ``shard_rows`` rows each.

    Rows whose id is already on disk (an earlier run on the same folder) or already
    written are dropped, so that a retried batch never yields a row twice.
    """

    def __init__(self, out: Path, shard_rows: int = 1000, meta: dict[str, Any] | None = None):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.meta = dict(meta or {})
        for stale in self.out.glob(PARTIAL_GLOB):  # a shard a stopped job did not finish
            stale.unlink()
        self.shards = sorted(self.out.glob(SHARD_GLOB))
        self.done: set[str] = set()
        self.counts: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            ids = pq.read_table(shard, columns=[rows.ID_FIELD, "error"])
            self.done.update(ids.column(rows.ID_FIELD).to_pylist())
            self.counts[shard.name] = _counts(ids)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.duplicates = 0

    def write(self, batch: pa.Table) -> int:
        """Queue a batch of output rows; write a shard when enough are queued. Returns
        how many of the rows were new."""
        ids = batch.column(rows.ID_FIELD).to_pylist()
        keep = [i for i, row_id in enumerate(ids) if row_id not in self.done]
        self.duplicates += len(ids) - len(keep)
        if len(keep) != len(ids):
            batch = batch.take(keep)
        self.done.update(batch.column(rows.ID_FIELD).to_pylist())
        if batch.num_rows:
            self.pending.append(batch)
            self.pending_rows += batch.num_rows
        if self.pending_rows >= self.shard_rows:
            self.flush()
        return batch.num_rows

    def flush(self) -> Path | None:
        """Write the queued rows as one shard and rewrite the manifest."""
        if not self.pending:
            return None
        data = pa.concat_tables(self.pending).cast(rows.SCHEMA)
        number = int(self.shards[-1].stem.split("-")[1]) + 1 if self.shards else 0
        shard = self.out / f"part-{number:05d}.parquet"
        partial = self.out / f".{shard.name}.partial"
        pq.write_table(data, partial)
        os.replace(partial, shard)
        self.shards.append(shard)
        self.counts[shard.name] = _counts(data)
        self.pending, self.pending_rows = [], 0
        self.write_manifest()
        return shard

    def write_manifest(self, **extra: Any) -> None:
        """``_manifest.json``: the shards with their rows and errors, and the job's facts."""
        manifest = {
            **self.meta,
            **extra,
            "schema": [f"{f.name}: {f.type}" for f in rows.SCHEMA],
            "rows": sum(c["rows"] for c in self.counts.values()),
            "errors": sum(c["errors"] for c in self.counts.values()),
            "shards": [{"path": name, **counts} for name, counts in self.counts.items()],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        partial = self.out / f".{MANIFEST}.partial"
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial, self.out / MANIFEST)


def _counts(data: pa.Table) -> dict[str, int]:
    return {"rows": data.num_rows, "errors": data.num_rows - data.column("error").null_count}


def read_rows(out: Path) -> pa.Table:
    """Every row of an output folder (its shards), for tests and quick looks."""
    shards = sorted(Path(out).glob(SHARD_GLOB))
    if not shards:
        return rows.SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(s, schema=rows.SCHEMA) for s in shards)
