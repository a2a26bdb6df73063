"""``depass-batch --ray`` on a real local Ray cluster (2 CPUs) and the embedded model.

200 requests (some refused) through a pool of 2 actors give the rows of the in-process
run; an actor killed mid-job costs no row and brings none twice (Ray restarts it and
retries its batches); a job killed and started again on its folder ends with the same
rows; a pool the cluster cannot hold fails at once, or after its start timeout, with a
message that says why, instead of hanging.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from depass_batch.io import ShardWriter, read_requests, read_rows
from depass_batch.options import RayOptions
from depass_batch.runner import PoolError, run
from depass_batch.worker import EngineSpec
from tests.ray.conftest import actor_processes, kill_one_actor

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "models" / "depass-tiny")
#: Requests batched differently on each path agree up to float rounding (engine docs).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
WORDS = "the cat sat on a mat with one dog and two birds near an old house by the river"
ACTOR = "MapWorker(MapBatches(AttributionWorker))"
#: Rows of the job that is killed and started again (the first of the 200).
KILLED_JOB_ROWS = 80


def requests(count: int) -> list[dict[str, Any]]:
    """``count`` short requests of a few kinds; every 20th is refused by the engine."""
    rng = random.Random(23)
    words = WORDS.split()
    out: list[dict[str, Any]] = []
    for i in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        record: dict[str, Any] = {"id": f"r{i:03d}", "prompt": prompt, "positions": [-1]}
        if i % 20 == 19:
            record["start_layer"] = 99  # outside the model: an error row
        elif i % 5 == 1:
            record.update(granularity="head", start_layer=[0, 2])
        elif i % 5 == 2:
            record.update(granularity="module", module="attn", start_layer=1)
        out.append(record)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests(200)))
    return path


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The in-process rows of the 200 requests, by id."""
    out = tmp_path_factory.mktemp("reference")
    summary = run(read_requests(source), EngineSpec(TINY, threads=1), ShardWriter(out))
    assert summary.rows == 200 and summary.errors == 10
    return {row["id"]: row for row in read_rows(out).to_pylist()}


def assert_same_rows(out: Path, reference: dict[str, dict], count: int = 200) -> None:
    """Each id exactly once, and each row the in-process one."""
    got = read_rows(out).to_pylist()
    ids = [row["id"] for row in got]
    assert len(ids) == len(set(ids)) == count, "a row is missing or written twice"
    for row in got:
        want = reference[row["id"]]
        assert row["error"] == want["error"], row["id"]
        for name in ("tokens", "components", "positions", "targets", "layers", "strategy"):
            assert row[name] == want[name], (row["id"], name)
        for name in ("scores", "remainder_scores", "logits"):
            if want[name] is None:
                assert row[name] is None
            else:
                torch.testing.assert_close(
                    torch.tensor(row[name]), torch.tensor(want[name]), **TOLERANCE
                )


def test_200_requests_through_2_actors_give_the_in_process_rows(
    ray_cluster: str, source: Path, reference: dict[str, dict], tmp_path: Path
) -> None:
    options = RayOptions(address=ray_cluster, actors=2)
    summary = run(read_requests(source), EngineSpec(TINY), ShardWriter(tmp_path, 64), 8, options)
    assert (summary.rows, summary.errors, summary.duplicates) == (200, 10, 0)
    assert_same_rows(tmp_path, reference)
    errors = [r for r in read_rows(tmp_path).to_pylist() if r["error"] is not None]
    assert {(e["error"]["type"], e["error"]["field"]) for e in errors} == {
        ("RequestError", "start_layer")
    }


def test_an_actor_killed_mid_job_loses_and_duplicates_no_row(
    ray_cluster: str, source: Path, reference: dict[str, dict], tmp_path: Path
) -> None:
    # Every request in batches of 2 (100 batches): the pool is still far from done after
    # the first batch, so the killed actor holds batches Ray must retry on its
    # replacement. (20 batches of 4 were not: on a loaded machine the survivor finished
    # them all before the replacement started, and the job ended without it.)
    items = read_requests(source)
    killed: list[int] = []
    before: set[int] = set()  # the pool's processes when one is killed
    seen: set[int] = set()  # and every one seen after

    def kill_after_the_first_batch(new_rows: int) -> None:
        if not killed:
            before.update(actor_processes(ACTOR))
            killed.append(kill_one_actor(ACTOR))
        seen.update(actor_processes(ACTOR))

    options = RayOptions(address=ray_cluster, actors=2)
    summary = run(
        items, EngineSpec(TINY), ShardWriter(tmp_path, 16), 2, options, kill_after_the_first_batch
    )
    assert killed, "no actor was killed"
    assert seen - before, "Ray started no actor in place of the killed one"
    assert (summary.rows, summary.duplicates) == (200, 0)
    assert_same_rows(tmp_path, reference)


def test_a_job_killed_and_started_again_ends_with_the_same_rows(
    ray_cluster: str, source: Path, reference: dict[str, dict], tmp_path: Path
) -> None:
    lines = source.read_text().splitlines(keepends=True)[:KILLED_JOB_ROWS]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(lines))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "depass_batch.cli",
        str(source),
        "--model",
        TINY,
        "--out",
        str(out),
        "--ray",
        ray_cluster,
        "--shard-rows",
        "8",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob("part-*.parquet"))) < 2:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no shards after 180 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    written = read_rows(out).num_rows
    assert 0 < written < KILLED_JOB_ROWS, written

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{written} already there" in again.stderr
    assert_same_rows(out, reference, count=KILLED_JOB_ROWS)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == KILLED_JOB_ROWS
    assert manifest["errors"] == KILLED_JOB_ROWS // 20


def test_a_pool_the_cluster_cannot_hold_fails_at_once(ray_cluster: str, tmp_path: Path) -> None:
    items = read_requests_of(tmp_path, requests(4))
    cases = [
        (RayOptions(address=ray_cluster, actors=5), r"5 actors x 0\.5 CPU need 2\.5 CPU"),
        (RayOptions(address=ray_cluster, actors=2, cpus_per_actor=1), "some left for Ray Data"),
        (RayOptions(address=ray_cluster, actors=1, gpus_per_actor=1), "has 0 GPU"),
    ]
    for options, message in cases:
        clock = time.monotonic()
        with pytest.raises(PoolError, match=message):
            run(items, EngineSpec(TINY), ShardWriter(tmp_path / "out"), 4, options)
        assert time.monotonic() - clock < 5


def test_a_pool_that_cannot_start_fails_after_its_timeout(ray_cluster: str, tmp_path: Path) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    hold = placement_group([{"CPU": 1.5}])  # leaves 0.5 CPU: one actor of the two
    ray.get(hold.ready(), timeout=30)
    try:
        items = read_requests_of(tmp_path, requests(8))
        options = RayOptions(address=ray_cluster, actors=2, start_timeout_s=5)
        clock = time.monotonic()
        with pytest.raises(PoolError, match="did not all start within 5 s"):
            run(items, EngineSpec(TINY), ShardWriter(tmp_path / "out"), 4, options)
        assert time.monotonic() - clock < 60
    finally:
        remove_placement_group(hold)


def read_requests_of(tmp_path: Path, records: list[dict[str, Any]]) -> list[dict[str, str]]:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_requests(path)
