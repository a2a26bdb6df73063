"""Run a job: input rows through workers into shards, in-process or on a Ray Data pool.

Both paths hand the same :class:`depass_batch.worker.AttributionWorker` the same batches
of input rows and write what it returns with the same
:class:`depass_batch.io.ShardWriter`; only where the workers live differs.

On Ray, the rows go through ``Dataset.map_batches`` with a fixed pool of actors, one
engine each, and stream back to this process as batches finish, where they are written.
Ray Data restarts an actor that dies (``max_restarts=-1``) and retries the batches it
held (``max_task_retries=-1``); their rows reach the writer once, since a batch that
died returned nothing, and the writer drops an id it has already written.

A pool the cluster cannot hold is refused before it starts (:class:`PoolError`): an
actor pool that takes every CPU leaves none for Ray Data's own tasks and waits forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from depass_batch.io import ShardWriter, input_table
from depass_batch.options import LOCAL_CLUSTER_ENV, RayOptions
from depass_batch.worker import AttributionWorker, EngineSpec

#: Called with the number of new rows after each batch is written.
Progress = Callable[[int], None]


class PoolError(RuntimeError):
    """The actor pool cannot be scheduled on this cluster (the message says why)."""


@dataclass
class Summary:
    """What a run did."""

    rows: int  # rows written by this run
    errors: int  # of which error rows
    skipped: int  # rows already in the output folder
    seconds: float
    duplicates: int  # rows a retried batch brought twice, dropped by the writer

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def run(
    items: list[dict[str, str]],
    spec: EngineSpec,
    writer: ShardWriter,
    batch_size: int = 8,
    ray_options: RayOptions | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Attribute the rows not yet in ``writer``'s folder and write them there."""
    todo = [item for item in items if item["id"] not in writer.done]
    skipped = len(items) - len(todo)
    errors_before = sum(c["errors"] for c in writer.counts.values())
    clock = time.perf_counter()
    written = 0
    batches = (
        _local_batches(todo, spec, batch_size)
        if ray_options is None
        else _ray_batches(todo, spec, batch_size, ray_options)
    )
    for batch in batches:
        new = writer.write(batch)
        written += new
        if progress is not None:
            progress(new)
    writer.flush()
    seconds = time.perf_counter() - clock
    errors = sum(c["errors"] for c in writer.counts.values()) - errors_before
    summary = Summary(written, errors, skipped, seconds, writer.duplicates)
    complete = all(item["id"] in writer.done for item in items)
    writer.write_manifest(complete=complete, total=len(items))
    return summary


def _local_batches(items: list[dict[str, str]], spec: EngineSpec, batch_size: int) -> Iterator[Any]:
    if not items:
        return
    worker = AttributionWorker(spec)
    for start in range(0, len(items), batch_size):
        yield worker(input_table(items[start : start + batch_size]))


def _ray_batches(
    items: list[dict[str, str]], spec: EngineSpec, batch_size: int, options: RayOptions
) -> Iterator[Any]:
    if not items:
        return
    if spec.threads is None:  # the cores of each actor's share of the cluster
        spec = dataclasses.replace(spec, threads=actor_threads(options))
    yield from actor_pool_batches(items, AttributionWorker, {"spec": spec}, batch_size, options)


def actor_threads(options: RayOptions) -> int:
    """torch threads per actor: the cluster's CPUs over the actors (at least 1)."""
    connect(options.address)
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1.0) // options.actors))


def actor_pool_batches(
    items: list[dict[str, str]],
    worker: type,
    worker_kwargs: dict[str, Any],
    batch_size: int,
    options: RayOptions,
) -> Iterator[Any]:
    """``items`` through a fixed Ray Data pool of ``worker(**worker_kwargs)`` actors, in
    batches of ``batch_size`` rows (pyarrow tables); their outputs as they finish.

    Raises:
        PoolError: the cluster cannot hold the pool, or the actors did not start in time.
    """
    connect(options.address)
    import ray
    import ray.data

    check_pool(options, ray.cluster_resources())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows, with the rate and ETA
    context.print_on_execution_start = False
    context.wait_for_min_actors_s = options.start_timeout_s
    # One block per batch, so that every actor has work from the start; from_items builds
    # the blocks here, with no Ray task (from_arrow runs one per block, which needs a
    # whole free CPU beside the actors).
    blocks = -(-len(items) // batch_size)
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        worker,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.GetTimeoutError:
        raise PoolError(
            f"the {options.actors} actors ({options.cpus_per_actor:g} CPU, "
            f"{options.gpus_per_actor:g} GPU each) did not all start within "
            f"{options.start_timeout_s} s: the cluster has "
            f"{_describe(ray.available_resources())} free of {_describe(ray.cluster_resources())} "
            "(other jobs hold the rest?); use fewer --actors or wait for room"
        ) from None


def connect(address: str | None) -> None:
    """Join (or start, with ``address=None``) a Ray cluster, unless already joined.

    A local cluster is a single-node one on 127.0.0.1 (:data:`LOCAL_CLUSTER_ENV`).
    """
    if address is None:
        for name, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def check_pool(options: RayOptions, resources: dict[str, float]) -> None:
    """Refuse a pool the cluster cannot hold, before any actor starts.

    Raises:
        PoolError: naming what the pool asks for and what the cluster has.
    """
    if options.actors < 1:
        raise PoolError("--actors must be at least 1")
    asks = {"CPU": options.actors * options.cpus_per_actor}
    if options.gpus_per_actor:
        asks["GPU"] = options.actors * options.gpus_per_actor
    for name, need in asks.items():
        have = resources.get(name, 0.0)
        # Ray Data's own tasks need CPU beside the actors: a pool may not take it all.
        short = need >= have if name == "CPU" else need > have
        if short:
            per_actor = options.cpus_per_actor if name == "CPU" else options.gpus_per_actor
            raise PoolError(
                f"{options.actors} actors x {per_actor:g} {name} need {need:g} {name}"
                f"{' and some left for Ray Data' if name == 'CPU' else ''}, but the cluster "
                f"has {have:g} {name} ({_describe(resources)}); use fewer --actors or "
                f"less --{name.lower()}s-per-actor"
            )


def _describe(resources: dict[str, float]) -> str:
    kept = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(kept.items())) or "no CPU or GPU"
