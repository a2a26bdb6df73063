"""``depass-batch``: attribute every request of a dataset, in-process or on Ray.

Examples::

    depass-batch requests.jsonl --model models/depass-tiny --out out/
    depass-batch requests/ --model HuggingFaceTB/SmolLM2-135M-Instruct --out out/ \\
        --ray --actors 2                     # a local Ray cluster on 127.0.0.1
    depass-batch requests.parquet --model /models/llama --out s3-mounted/out \\
        --ray auto --actors 8 --gpus-per-actor 1 --device cuda --dtype bfloat16

The output folder holds Parquet shards (one row per request: ``id``, ``error``, the
result's fields) and ``_manifest.json``; run the same command again after a stop and it
skips the ids already written. Exit status 0 when every row is written (error rows
included), 1 on a job that could not run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from depass_batch.io import ShardWriter, read_requests
from depass_batch.options import add_ray_arguments, ray_options
from depass_batch.runner import PoolError, Summary, run
from depass_batch.worker import EngineSpec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="depass-batch",
        description="DePass attributions of every request in a JSONL or Parquet file "
        "(or a folder of them), written to Parquet shards; resumable by id.",
    )
    p.add_argument("input", type=Path, help="JSONL or Parquet file, or a folder of them.")
    p.add_argument("--model", required=True, help="Hub id, model folder or .gguf file.")
    p.add_argument("--out", required=True, type=Path, help="Output folder (shards, manifest).")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu).")
    p.add_argument("--dtype", default="float32", help="Weight dtype (default: float32).")
    add_ray_arguments(p, "an engine")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per engine (default: in-process torch's own; on Ray the "
        "cluster's CPUs divided by the actors).",
    )
    p.add_argument("--batch-size", type=int, default=8, help="Rows per worker call (default 8).")
    p.add_argument(
        "--max-batch", type=int, default=8, help="Most requests the engine runs as one batch."
    )
    p.add_argument(
        "--shard-rows", type=int, default=1000, help="Rows per output shard (default 1000)."
    )
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("batch_size", "max_batch", "shard_rows"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        pool = ray_options(args)
    except ValueError as exc:
        parser().error(str(exc))
    try:
        items = read_requests(args.input)
    except (OSError, ValueError) as exc:
        print(f"depass-batch: {exc}", file=sys.stderr)
        return 2
    spec = EngineSpec(
        args.model, args.device, args.dtype, args.threads, {"max_batch": args.max_batch}
    )
    meta = {"input": str(args.input), "model": args.model, "ray": args.ray is not None}
    writer = ShardWriter(args.out, args.shard_rows, meta)
    bar = _progress_bar(len(items), len(writer.done & {i["id"] for i in items}), args.no_progress)
    try:
        summary = run(items, spec, writer, args.batch_size, pool, bar.update)
    except PoolError as exc:
        print(f"depass-batch: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    print(_report(summary, args.out), file=sys.stderr)
    return 0


def _progress_bar(total: int, done: int, disabled: bool) -> Any:
    """rows written, rows/s and the ETA (tqdm's own), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="row", disable=disabled, smoothing=0.1)


def _report(summary: Summary, out: Path) -> str:
    return (
        f"depass-batch: wrote {summary.rows} rows ({summary.errors} errors) to {out} in "
        f"{summary.seconds:.1f} s, {summary.rows_per_s:.2f} rows/s; "
        f"{summary.skipped} already there"
    )


if __name__ == "__main__":
    raise SystemExit(main())
