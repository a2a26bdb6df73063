"""Prometheus metrics, named ``depass_*`` with their unit, on a registry of the app's own.

A registry per app (not the process-wide default) lets several apps live in one process,
as they do in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)

#: Content type of the text exposition format.
CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    """The service's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "depass_requests_total",
            "HTTP requests by route, granularity and status code.",
            ["route", "method", "granularity", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "depass_request_duration_seconds",
            "Time from request start to the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "depass_queue_wait_seconds",
            "Time a job waited for the worker.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_duration = Histogram(
            "depass_engine_duration_seconds",
            "Time the worker spent on a job, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "depass_batch_size_requests",
            "Attribution requests run together in one batch (batches of two or more).",
            buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge(
            "depass_queue_depth_requests", "Jobs waiting for the worker.", registry=r
        )
        self.worker_busy = Gauge(
            "depass_worker_busy", "1 while the worker runs a job, else 0.", registry=r
        )
        self.input_tokens = Histogram(
            "depass_input_tokens",
            "Input length of accepted requests, in tokens, by operation.",
            ["operation"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.skipped = Counter(
            "depass_skipped_jobs_total",
            "Queued jobs dropped without compute, by reason.",
            ["reason"],
            registry=r,
        )
        self.stopped = Counter(
            "depass_stopped_jobs_total",
            "Running jobs stopped early, their result no longer wanted, by reason "
            "('expired': past DEPASS_REQUEST_TIMEOUT_S; 'disconnected': the client left).",
            ["reason"],
            registry=r,
        )
        self.out_of_memory = Counter(
            "depass_out_of_memory_total", "Jobs that ran out of memory (answered 503).", registry=r
        )
        self.gpu_peak_memory = Gauge(
            "depass_gpu_peak_memory_bytes",
            "Peak accelerator memory allocated by torch since start (0 without CUDA).",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "depass_gpu_memory_allocated_bytes",
            "Accelerator memory allocated by torch now (0 without CUDA).",
            registry=r,
        )
        self.model_loaded = Gauge(
            "depass_model_loaded", "1 when the model is loaded and serving.", registry=r
        )

    def track_worker(self, depth: Callable[[], float], busy: Callable[[], float]) -> None:
        """Read the queue depth and whether the worker is busy at each scrape."""
        self.queue_depth.set_function(depth)
        self.worker_busy.set_function(busy)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
