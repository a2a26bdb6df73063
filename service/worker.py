"""One worker thread per model, fed by a bounded queue.

Model work is serial on one accelerator anyway; running it on a dedicated thread keeps the
event loop free for health checks, metrics and queue admission, and the bounded queue turns
overload into a fast 429 rather than a pile of timeouts. A job is skipped, costing no compute,
when its client went away or its deadline passed while it waited. A running job gets a
``should_stop`` callable to poll (the engine does, between layers and chunks): it turns True
as soon as the deadline passes or the waiting request gives up, so the job stops and the
worker moves on to the next one at once.

Batching: a job submitted with a :class:`Batchable` may run together with the other
queued jobs of the same key (up to ``max_batch``), through the worker's ``batch_runner``,
in one call that serves them all; each job still gets its own value. A batch stops when
every member wants to stop; when a batch fails, its jobs run again one by one, so an error
reaches only the request that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from engine import Cancelled
from service.errors import (
    ClientDisconnectedError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
)

T = TypeVar("T")
#: Polled by a running job; True once its result is no longer wanted.
StopCheck = Callable[[], bool]

logger = logging.getLogger(__name__)

#: How often a waiting request checks whether its client is still there.
POLL_S = 0.05


#: Runs the items of several batched jobs in one call; returns their values in order.
BatchRunner = Callable[[list[Any], StopCheck], list[Any]]


@dataclass(frozen=True)
class Batchable:
    """How a job may share a run: jobs with equal ``key`` may be batched, and the batch
    runner receives their ``item``s."""

    key: Hashable
    item: Any


@dataclass
class _Job(Generic[T]):
    fn: Callable[[StopCheck], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is not started, or is stopped
    enqueued: float
    batch: Batchable | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"  # why the waiting side gave up, once ``abandoned`` is set
    started: float | None = None
    batch_size: int = 1

    def should_stop(self) -> bool:
        """Whether the job should stop: its request gave up, or its deadline passed."""
        return self.abandoned.is_set() or time.monotonic() >= self.deadline


@dataclass(frozen=True)
class Done(Generic[T]):
    """A job's value with the seconds it waited in the queue and ran, and how many jobs
    ran with it (1: alone)."""

    value: T
    queue_s: float
    run_s: float
    batch_size: int = 1


class QueueFull(Exception):
    """The job queue holds ``maxsize`` jobs."""


class _JobQueue:
    """A bounded FIFO of jobs from which the jobs of one batch key can also be taken."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._jobs: deque[_Job[Any]] = deque()
        self._ready = threading.Condition()

    def put_nowait(self, job: _Job[Any]) -> None:
        with self._ready:
            if len(self._jobs) >= self.maxsize:
                raise QueueFull
            self._jobs.append(job)
            self._ready.notify()

    def get(self, timeout: float) -> _Job[Any] | None:
        with self._ready:
            if not self._jobs:
                self._ready.wait(timeout)
            return self._jobs.popleft() if self._jobs else None

    def take(self, key: Hashable, limit: int) -> list[_Job[Any]]:
        """Remove and return up to ``limit`` queued jobs with batch key ``key``, oldest
        first."""
        with self._ready:
            taken = [j for j in self._jobs if j.batch is not None and j.batch.key == key]
            taken = taken[:limit]
            for job in taken:
                self._jobs.remove(job)
            return taken

    def qsize(self) -> int:
        with self._ready:
            return len(self._jobs)


class Worker:
    """Runs submitted callables one at a time on its own thread, in arrival order.

    Args:
        max_queue: jobs that may wait (the running one not counted) before ``submit``
            answers :class:`QueueFullError`.
        on_skip: called with the reason (``"disconnected"``, ``"expired"``, ``"cancelled"``)
            of each job skipped without running.
        on_stop: called with the reason of each job that was stopped while running (it
            raised after ``should_stop`` turned True).
        batch_runner: runs the items of batchable jobs together (see the module's text);
            without one, every job runs alone.
        max_batch: most jobs in one batch.
    """

    def __init__(
        self,
        max_queue: int,
        name: str = "depass-worker",
        on_skip: Callable[[str], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
        batch_runner: BatchRunner | None = None,
        max_batch: int = 1,
    ) -> None:
        self._queue = _JobQueue(max_queue)
        self._batch_runner = batch_runner
        self._max_batch = max_batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._on_skip = on_skip or (lambda reason: None)
        self._on_stop = on_stop or (lambda reason: None)
        self._mean_run_s = 1.0  # moving average, for Retry-After
        self.busy = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the running job, refuse the queued ones, and join the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        while (job := self._queue.get(timeout=0)) is not None:
            _settle(job, error=NotReadyError("the service is shutting down"))

    @property
    def depth(self) -> int:
        """Jobs waiting (the running one not counted)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """Whether the thread runs and takes jobs (``/ready`` answers 503 otherwise)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def retry_after_s(self) -> float:
        """A guess of when a slot frees up: the queue ahead times the mean run time."""
        return max(1.0, math.ceil((self.depth + 1) * self._mean_run_s))

    # ------------------------------------------------------------------ submit

    async def submit(
        self,
        fn: Callable[[StopCheck], T],
        *,
        timeout_s: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        batch: Batchable | None = None,
    ) -> Done[T]:
        """Run ``fn(should_stop)`` on the worker and wait for it (or, with ``batch``, maybe
        its item together with other queued jobs' through the batch runner).

        ``fn`` should poll ``should_stop`` between units of work and stop (by raising) when
        it turns True: then a request that times out or loses its client frees the worker
        at once instead of after the rest of its work.

        Raises:
            QueueFullError: the queue is full (429).
            RequestTimeoutError: ``timeout_s`` passed, waiting or running (504); a queued
                job is then dropped, a running one is told to stop.
            ClientDisconnectedError: the client went away, while the job waited (it is
                dropped) or ran (it is told to stop).
            NotReadyError: the worker stopped.
        """
        if self._stop.is_set():
            raise NotReadyError("the service is shutting down")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job: _Job[T] = _Job(fn, loop.create_future(), loop, now + timeout_s, now, batch)
        try:
            self._queue.put_nowait(job)
        except QueueFull:
            raise QueueFullError(
                f"the queue is full ({self._queue.maxsize} requests waiting); retry later",
                retry_after_s=self.retry_after_s(),
            ) from None
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    job.reason = "expired"
                    raise RequestTimeoutError(
                        f"the request took longer than its timeout of {timeout_s:g} s"
                    )
                done, _ = await asyncio.wait({job.future}, timeout=min(POLL_S, remaining))
                if done:
                    if _stopped_by_deadline(job):  # the worker saw the deadline first
                        job.reason = "expired"
                        raise RequestTimeoutError(
                            f"the request took longer than its timeout of {timeout_s:g} s"
                        )
                    value = job.future.result()
                    started = job.started or now
                    elapsed = time.monotonic() - started
                    return Done(value, started - job.enqueued, elapsed, job.batch_size)
                if is_disconnected is not None and await is_disconnected():
                    job.reason = "disconnected"
                    raise ClientDisconnectedError("the client disconnected")
        finally:
            # A job not yet started is skipped by the worker; a running one sees
            # should_stop() turn True and stops.
            job.abandoned.set()
            if not job.future.done():
                job.future.cancel()

    # ------------------------------------------------------------------ thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get(timeout=0.2)
            if job is None:
                continue
            jobs = [job, *self._companions(job)]
            try:
                if len(jobs) == 1:
                    self._run(job)
                else:
                    self._run_batch(jobs)
            except Exception:  # a bug in a callback: log it, keep serving
                logger.exception("the worker failed on a job")
                for each in jobs:
                    _settle(each, error=RuntimeError("the worker failed on this job"))

    def _companions(self, job: _Job[Any]) -> list[_Job[Any]]:
        """Queued jobs that may run with ``job`` (same batch key, still wanted)."""
        if job.batch is None or self._batch_runner is None or self._max_batch < 2:
            return []
        taken = self._queue.take(job.batch.key, self._max_batch - 1)
        wanted = []
        for other in taken:
            if self._runnable(other):
                wanted.append(other)
        return wanted

    def _runnable(self, job: _Job[Any]) -> bool:
        """False (and the job settled or skipped) when it was abandoned or expired."""
        if job.abandoned.is_set():
            self._on_skip(job.reason)
            return False
        if time.monotonic() >= job.deadline:
            self._on_skip("expired")
            _settle(job, error=RequestTimeoutError("the request expired while queued"))
            return False
        return True

    def _run(self, job: _Job[Any]) -> None:
        """Run one job unless it was abandoned or expired while queued."""
        if not self._runnable(job):
            return
        job.started = time.monotonic()
        self.busy = True
        try:
            value = job.fn(job.should_stop)
        except BaseException as exc:  # delivered to the waiting request, if any
            if job.should_stop():
                self._on_stop(job.reason if job.abandoned.is_set() else "expired")
            _settle(job, error=exc)
        else:
            _settle(job, value=value)
        finally:
            self.busy = False
            self._record(time.monotonic() - job.started)

    def _run_batch(self, jobs: list[_Job[Any]]) -> None:
        """Run several jobs' items in one call; on failure, run them again one by one."""
        jobs = [job for job in jobs if self._runnable(job)]
        if len(jobs) < 2:
            for job in jobs:
                self._run(job)
            return
        assert self._batch_runner is not None
        started = time.monotonic()
        for job in jobs:
            job.started, job.batch_size = started, len(jobs)
        self.busy = True
        try:
            items = [job.batch.item for job in jobs if job.batch is not None]
            values = self._batch_runner(items, lambda: all(j.should_stop() for j in jobs))
        except Exception:
            logger.info(
                "a batch of %d failed; running its jobs one by one", len(jobs), exc_info=True
            )
            values = None
        finally:
            self.busy = False
        if values is None:
            for job in jobs:
                job.batch_size = 1
                self._run(job)
            return
        self._record((time.monotonic() - started) / len(jobs))
        for job, value in zip(jobs, values, strict=True):
            _settle(job, value=value)

    def _record(self, elapsed: float) -> None:
        """Fold one job's run time into the mean used for Retry-After."""
        self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * elapsed


def _settle(job: _Job[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Hand a job's outcome to its event loop (thread-safe; a no-op if nobody waits)."""

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        job.loop.call_soon_threadsafe(settle)


def _stopped_by_deadline(job: _Job[Any]) -> bool:
    """The job ended because its deadline passed (its work polled ``should_stop`` and
    stopped with :class:`engine.Cancelled`), not because it failed or its client left."""
    if job.future.cancelled() or job.abandoned.is_set():
        return False
    error = job.future.exception()
    return isinstance(error, Cancelled) and time.monotonic() >= job.deadline
