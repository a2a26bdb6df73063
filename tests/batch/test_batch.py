"""``depass-batch`` in-process (no Ray) on the embedded model ``models/depass-tiny``.

The rows hold what the engine returns for each request alone (the SDK reads them back
into the same arrays), refused requests become error rows naming the field, every field
of the engine's result is a column, and a job started again on its output folder writes
only the rows that are missing. The Ray path is in ``tests/ray``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from depass_batch import rows
from depass_batch.cli import main as batch_main
from depass_batch.io import ShardWriter, read_requests, read_rows
from depass_batch.runner import run
from depass_batch.worker import EngineSpec
from depass_client import read_batch
from engine import AttributionRequest, AttributionResult, DePassEngine

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "models" / "depass-tiny")
#: Rows batched with others are the rows run alone up to float rounding (engine docs).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}

GOOD = [
    {"id": "plain", "prompt": "the cat sat on the"},
    {"id": "heads", "prompt": "one two three", "granularity": "head", "start_layer": [0, 1]},
    {"id": "ids", "input_ids": [5, 6, 7], "outputs": ["scores", "states"], "targets": [4, "the"]},
    {"id": "module", "prompt": "a dog and a bird", "granularity": "module", "module": "mlp"},
    {"id": "layers", "prompt": "near the old house", "all_layers": True, "positions": [-1]},
]
BAD = [
    ({"id": "granularity", "prompt": "hi", "granularity": "bogus"}, "granularity"),
    ({"id": "layer", "prompt": "hi", "start_layer": 99}, "start_layer"),
    ({"id": "unknown", "prompt": "hi", "colour": "red"}, "colour"),
    ({"id": "two-inputs", "prompt": "hi", "input_ids": [1, 2]}, "prompt"),
]


@pytest.fixture(scope="module")
def tiny() -> DePassEngine:
    return DePassEngine.from_pretrained(TINY)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_result_field_is_a_column_and_tensors_have_their_rank() -> None:
    hints = typing.get_type_hints(AttributionResult)
    fields = [f.name for f in dataclasses.fields(AttributionResult)]
    tensors = {n for n in fields if torch.Tensor in (hints[n], *typing.get_args(hints[n]))}
    assert set(rows.TENSOR_RANKS) == tensors
    names = rows.SCHEMA.names
    assert names[:4] == ["id", "error", "request", "strategy"]
    assert set(fields) <= set(names)
    assert rows.SCHEMA.field("scores").type == pa.list_(pa.list_(pa.list_(pa.list_(pa.float32()))))
    assert rows.SCHEMA.field("timings").type == pa.map_(pa.string(), pa.float64())
    assert rows.SCHEMA.field("layers").type == pa.list_(pa.int64())


def test_a_job_writes_each_result_and_error_row(tmp_path: Path, tiny: DePassEngine) -> None:
    records = GOOD + [bad for bad, _ in BAD]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    assert (
        batch_main([str(source), "--model", TINY, "--out", str(tmp_path / "out"), "--no-progress"])
        == 0
    )

    table = read_rows(tmp_path / "out")
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in records)
    for bad, field in BAD:
        error = by_id[bad["id"]]["error"]
        assert error["type"] == "RequestError" and error["field"] == field, error
        assert error["message"]
        assert by_id[bad["id"]]["scores"] is None
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["rows"] == len(records) and manifest["errors"] == len(BAD)
    assert manifest["complete"] is True
    frame = pandas.read_parquet(tmp_path / "out")  # the folder: the shards, not the manifest
    assert sorted(frame["id"]) == sorted(by_id) and frame["scores"].notna().sum() == len(GOOD)

    read = {row.id: row for row in read_batch(tmp_path / "out")}
    for record in GOOD:
        fields = {k: v for k, v in record.items() if k != "id"}
        expected = tiny.attribute(AttributionRequest(**fields))
        row = read[record["id"]]
        assert row.error is None and row.strategy == getattr(expected, "strategy", "forward")
        got = row.attribution
        assert got is not None
        assert got.tokens == expected.tokens and got.components == expected.components
        assert got.layers == expected.layers and got.positions == expected.positions
        assert got.position_targets == expected.position_targets
        for name in ("scores", "remainder_scores", "logits", "states", "remainder"):
            want = getattr(expected, name)
            if want is None:
                assert getattr(got, name) is None, name
            else:
                torch.testing.assert_close(torch.from_numpy(getattr(got, name)), want, **TOLERANCE)
        assert got.conservation_error == pytest.approx(expected.conservation_error, abs=1e-5)
        assert {"forward_s", "decompose_s", "batch_size"} <= set(got.timings)
    assert read["ids"].attribution.states is not None  # asked for
    assert read["plain"].attribution.states is None  # not asked for


def test_a_job_started_again_writes_only_the_missing_rows(tmp_path: Path) -> None:
    items = read_requests(write_jsonl(tmp_path / "in.jsonl", GOOD))
    spec = EngineSpec(TINY)
    first = run(items[:2], spec, ShardWriter(tmp_path / "out", shard_rows=1))
    assert (first.rows, first.skipped) == (2, 0)
    torn = tmp_path / "out" / ".part-00002.parquet.partial"  # a shard a kill cut short
    torn.write_bytes(b"PAR1 cut short")
    again = run(items, spec, ShardWriter(tmp_path / "out", shard_rows=1))
    assert not torn.exists()
    assert (again.rows, again.skipped, again.duplicates) == (3, 2, 0)
    done = run(items, spec, ShardWriter(tmp_path / "out", shard_rows=1))
    assert (done.rows, done.skipped) == (0, 5)
    ids = read_rows(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in GOOD)


def test_a_writer_drops_rows_already_written(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_rows=100)
    row = {"id": "x", "error": {"type": "E", "field": None, "message": "m"}, "request": "{}"}
    assert writer.write(rows.table([row])) == 1
    assert writer.write(rows.table([row, {**row, "id": "y"}])) == 1
    writer.flush()
    assert read_rows(tmp_path).column("id").to_pylist() == ["x", "y"]
    assert writer.duplicates == 1


def test_inputs_parquet_folders_default_ids_and_duplicates(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "three", "positions": [-1]}]), folder / "b.parquet"
    )
    items = read_requests(folder)
    assert [i["id"] for i in items] == ["0", "1", "2"]  # the row's index when no id
    assert json.loads(items[2]["request"]) == {"prompt": "three", "positions": [-1]}
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}])
    with pytest.raises(ValueError, match="id '1' is in rows 0 and 1"):
        read_requests(tmp_path / "dup.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        read_requests(tmp_path / "broken.jsonl")


def test_a_row_that_is_not_an_object_is_an_error_row(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('["not", "an", "object"]\n{"prompt": "fine"}\n')
    assert (
        batch_main([str(source), "--model", TINY, "--out", str(tmp_path / "o"), "--no-progress"])
        == 0
    )
    first, second = sorted(read_rows(tmp_path / "o").to_pylist(), key=lambda r: r["id"])
    assert first["error"]["field"] == "request" and second["error"] is None
