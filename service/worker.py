"""One worker thread per model, fed by a bounded queue.

Model work is serial on one accelerator anyway; running it on a dedicated thread keeps the
event loop free for health checks, metrics and queue admission, and the bounded queue turns
overload into a fast 429 rather than a pile of timeouts. A job is skipped, costing no compute,
when its client went away or its deadline passed while it waited. A running job gets a
``should_stop`` callable to poll (the engine does, between layers and chunks): it turns True
as soon as the deadline passes or the waiting request gives up, so the job stops and the
worker moves on to the next one at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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


@dataclass
class _Job(Generic[T]):
    fn: Callable[[StopCheck], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is not started, or is stopped
    enqueued: float
    abandoned: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"  # why the waiting side gave up, once ``abandoned`` is set
    started: float | None = None

    def should_stop(self) -> bool:
        """Whether the job should stop: its request gave up, or its deadline passed."""
        return self.abandoned.is_set() or time.monotonic() >= self.deadline


@dataclass(frozen=True)
class Done(Generic[T]):
    """A job's value with the seconds it waited in the queue and ran."""

    value: T
    queue_s: float
    run_s: float


class Worker:
    """Runs submitted callables one at a time on its own thread, in arrival order.

    Args:
        max_queue: jobs that may wait (the running one not counted) before ``submit``
            answers :class:`QueueFullError`.
        on_skip: called with the reason (``"disconnected"``, ``"expired"``, ``"cancelled"``)
            of each job skipped without running.
        on_stop: called with the reason of each job that was stopped while running (it
            raised after ``should_stop`` turned True).
    """

    def __init__(
        self,
        max_queue: int,
        name: str = "depass-worker",
        on_skip: Callable[[str], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
    ) -> None:
        self._queue: queue.Queue[_Job[Any]] = queue.Queue(maxsize=max_queue)
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
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
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
    ) -> Done[T]:
        """Run ``fn(should_stop)`` on the worker and wait for it.

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
        job: _Job[T] = _Job(fn, loop.create_future(), loop, now + timeout_s, now)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
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
                    value = job.future.result()
                    started = job.started or now
                    return Done(value, started - job.enqueued, time.monotonic() - started)
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
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._run(job)
            except Exception:  # a bug in a callback: log it, keep serving
                logger.exception("the worker failed on a job")
                _settle(job, error=RuntimeError("the worker failed on this job"))

    def _run(self, job: _Job[Any]) -> None:
        """Run one job unless it was abandoned or expired while queued."""
        if job.abandoned.is_set():
            self._on_skip(job.reason)
            return
        if time.monotonic() >= job.deadline:
            self._on_skip("expired")
            _settle(job, error=RequestTimeoutError("the request expired while queued"))
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
            elapsed = time.monotonic() - job.started
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
