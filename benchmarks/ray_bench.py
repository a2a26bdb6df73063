"""Rows per second of ``depass-batch`` in-process against a Ray Data pool, in one run.

    python benchmarks/ray_bench.py                       # embedded model and SmolLM2
    python benchmarks/ray_bench.py --models tiny --rows 200 --repeats 3

For each model, the same ``--rows`` short token-level requests (``positions=[-1]``) run
through :func:`depass_batch.runner.run` three ways: in-process with 1 torch thread and
with ``--actors`` threads (the whole machine), and on a local Ray cluster (127.0.0.1)
with ``--actors`` actors of 1 thread each. Each job is timed twice: end to end (model
loads and actor starts included) and in steady state (from its first written batch to
its last, which leaves out the loads). Output: one JSON line per job (medians over
``--repeats``) and a summary line per model with the ratios Ray / in-process, and the
Ray path's overhead per request: ``actors / ray rows/s - 1 / in-process(1 thread)
rows/s``, the time each actor spends per row beyond what the same engine spends in-process.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from depass_batch.io import ShardWriter  # noqa: E402
from depass_batch.options import RayOptions  # noqa: E402
from depass_batch.runner import connect, run  # noqa: E402
from depass_batch.worker import EngineSpec  # noqa: E402

WORDS = "the cat sat on a mat with one dog and two birds near an old house by the river".split()


def model_path(name: str) -> str | None:
    """The embedded model's folder, or a real model's GGUF file (None when absent)."""
    if name == "tiny":
        return str(REPO / "models" / "depass-tiny")
    import real_models

    try:
        path = real_models.gguf_path(name)
    except FileNotFoundError:
        return None
    return str(path) if path.is_file() else None


def items(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        request = {"prompt": prompt, "positions": [-1]}
        out.append({"id": f"r{i}", "request": json.dumps(request)})
    return out


def job(
    rows: list[dict[str, str]], spec: EngineSpec, batch: int, ray: RayOptions | None
) -> dict[str, float]:
    """One run into a fresh folder: end-to-end and steady-state rows/s."""
    marks: list[tuple[float, int]] = []

    def progress(new: int) -> None:
        marks.append((time.perf_counter(), new))

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run(rows, spec, ShardWriter(Path(out), 10_000), batch, ray, progress)
        end = time.perf_counter()
    assert summary.rows == len(rows) and summary.errors == 0, summary
    first_time, first_rows = marks[0]
    steady_rows = len(rows) - first_rows
    steady_s = marks[-1][0] - first_time
    return {
        "end_to_end_rows_s": len(rows) / (end - start),
        "steady_rows_s": steady_rows / steady_s if steady_s > 0 else float("nan"),
        "startup_s": first_time - start,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--smollm2-rows", type=int, default=60)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    connect(None)  # a local cluster, started once (its startup is not in any job)
    ray = RayOptions(address=None, actors=args.actors, cpus_per_actor=0.5)
    for name in args.models:
        path = model_path(name)
        if path is None:
            print(json.dumps({"model": name, "skipped": "not installed (make real-models)"}))
            continue
        rows = items(args.rows if name == "tiny" else args.smollm2_rows)
        modes: dict[str, tuple[EngineSpec, RayOptions | None]] = {
            "in-process-1-thread": (EngineSpec(path, threads=1), None),
            f"in-process-{args.actors}-threads": (EngineSpec(path, threads=args.actors), None),
            f"ray-{args.actors}-actors-x-1-thread": (EngineSpec(path, threads=1), ray),
        }
        results: dict[str, dict[str, Any]] = {}
        for mode, (spec, options) in modes.items():
            runs = [job(rows, spec, args.batch_size, options) for _ in range(args.repeats)]
            results[mode] = {"model": name, "mode": mode, "rows": len(rows), **median_of(runs)}
            print(json.dumps(results[mode]), flush=True)
        one, whole, on_ray = results.values()
        overhead_ms = 1000 * (args.actors / on_ray["steady_rows_s"] - 1 / one["steady_rows_s"])
        print(
            json.dumps(
                {
                    "model": name,
                    "ray_over_in_process_1_thread": on_ray["steady_rows_s"] / one["steady_rows_s"],
                    "ray_over_in_process_whole_machine": on_ray["steady_rows_s"]
                    / whole["steady_rows_s"],
                    "end_to_end_ray_over_in_process_whole_machine": on_ray["end_to_end_rows_s"]
                    / whole["end_to_end_rows_s"],
                    "ray_overhead_ms_per_row_per_actor": overhead_ms,
                    "ray_startup_s": on_ray["startup_s"],
                    "in_process_startup_s": whole["startup_s"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
