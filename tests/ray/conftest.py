"""One local Ray cluster for the whole test session (2 CPUs, on 127.0.0.1 only).

Starting Ray takes seconds, so every test of this folder shares the cluster that
``ray_cluster`` starts in this process (its address lets subprocesses, such as the
``depass-batch --ray ADDRESS`` runs, join it). Without Ray installed the tests skip,
except under CI (``CI`` set), whose ``make test`` installs the ``ray`` extra: there they
fail.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from depass_batch.options import LOCAL_CLUSTER_ENV

#: The cluster's CPUs: the machine CI runs on has 2; the tests size pools for that.
CLUSTER_CPUS = 2
# Before Ray is imported: a single-node cluster, which keeps every Ray process and
# connection on 127.0.0.1, and no usage reports.
os.environ.update(LOCAL_CLUSTER_ENV)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the ray extra (make test): {exc}")
        pytest.skip(f"ray is not installed (pip install '.[ray]'): {exc}")
    return ray


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The session's local Ray cluster; yields its address (``host:port`` of its GCS)."""
    ray = _import_ray()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=CLUSTER_CPUS,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        try:
            if "ray.serve" in sys.modules:  # a test started Serve
                sys.modules["ray.serve"].shutdown()
        finally:
            ray.shutdown()


def actor_processes(class_fragment: str) -> list[int]:
    """Pids of this session's Ray actors whose process title holds ``class_fragment``
    (the cluster's processes are this process's descendants)."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if class_fragment in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def kill_one_actor(class_fragment: str, timeout_s: float = 60.0) -> int:
    """SIGKILL one live actor process of this session (as a crash would); its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = actor_processes(class_fragment)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.2)
    raise AssertionError(f"no actor process with {class_fragment!r} in its title")
