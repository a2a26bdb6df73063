"""The real service, ``python -m service`` on a free loopback port: load, memory, queued
clients that leave, and SIGTERM.

The model is the embedded ``models/depass-tiny`` when present, else a random model of its
shape. The load test is ``scripts/load_test.py`` (what ``make load`` runs for 60 s) for
``DEPASS_LOAD_SECONDS`` (default 5); its figures, and the memory figures, are printed at
the end of the run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.arrays import encode_array
from tests.service.support import REPORT, load_test_module, metric, rss_bytes

LOAD = load_test_module()
LOAD_SECONDS = float(os.environ.get("DEPASS_LOAD_SECONDS", "5"))
#: A request that keeps the worker busy for a second or more on the embedded model.
SLOW = {
    "prompt": " ".join(["When Mary and John went to the store , John gave a drink to"] * 9),
    "granularity": "neuron",
    "start_layer": 0,
    "positions": [-1],
}
QUICK = {"prompt": "The capital of France is", "positions": [-1]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(LOAD.default_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("logs") / "service.log"
    with LOAD.serve(model_dir, log, OMP_NUM_THREADS="2") as served:
        yield served


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` on a thread; the returned callable joins it and gives its value."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(120)
        assert not thread.is_alive(), "the request did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


# ---------------------------------------------------------------------------- load


def test_32_clients_get_no_5xx_and_429_only_when_the_queue_is_full(server: Any) -> None:
    report = asyncio.run(LOAD.run_load(server.url, clients=32, duration_s=LOAD_SECONDS))
    REPORT.extend(report.lines())
    assert report.server_errors == 0 and report.transport_errors == 0, report.statuses
    assert report.bad_429 == [], report.bad_429[:3]
    assert report.ok > 0
    assert set(report.statuses) <= {"200", "429"}, report.statuses
    assert metric(server.url, "depass_queue_depth_requests") == 0


# ---------------------------------------------------------------------------- memory


def mixed_requests(client: httpx.Client) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every granularity, generation and tokenization, on 12 prompts (more than the
    trace cache holds, so that it evicts)."""
    words = "the capital of France is Paris and Mary gave John a drink at the store".split()
    prompts = [" ".join(words[i : i + 4 + i % 5]) for i in range(12)]
    hidden = client.get("/v1/model").json()["hidden_size"]
    kinds: list[Callable[[str], tuple[str, dict[str, Any]]]] = [
        lambda p: ("/v1/attributions", {"prompt": p}),
        lambda p: ("/v1/attributions", {"prompt": p, "outputs": ["scores", "states"]}),
        lambda p: ("/v1/attributions", {"prompt": p, "granularity": "module", "module": "attn"}),
        lambda p: ("/v1/attributions", {"prompt": p, "granularity": "head", "start_layer": [0, 1]}),
        lambda p: ("/v1/attributions", {"prompt": p, "granularity": "neuron", "positions": [-1]}),
        lambda p: ("/v1/attributions", {"prompt": p, "all_layers": True, "positions": [-1]}),
        lambda p: ("/v1/generate", {"prompt": p, "max_new_tokens": 3}),
        lambda p: ("/v1/tokenize", {"prompt": p}),
    ]
    for index in itertools.count():
        prompt = prompts[index % len(prompts)]
        if index % 9 == 8:
            n = client.post("/v1/tokenize", json={"prompt": prompt}).json()["num_tokens"]
            subspace = np.random.default_rng(index).normal(size=(2, n, hidden)).astype(np.float32)
            body = {
                "prompt": prompt,
                "granularity": "subspace",
                "start_layer": 1,
                "subspace": encode_array(subspace, "zstd+base64"),
            }
            yield "/v1/attributions", body
        else:
            yield kinds[index % len(kinds)](prompt)


def test_300_mixed_requests_leave_memory_flat(server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        requests = mixed_requests(client)

        def run(count: int) -> None:
            for _ in range(count):
                route, body = next(requests)
                response = client.post(route, json=body)
                assert response.status_code == 200, (route, body, response.text[:300])

        run(120)  # warm-up: every kind, every prompt, the trace cache full
        rss_warm = rss_bytes(server.pid)
        gpu_warm = metric(server.url, "depass_gpu_memory_allocated_bytes")
        run(300)
        rss_after = rss_bytes(server.pid)
        gpu_after = metric(server.url, "depass_gpu_memory_allocated_bytes")
    growth = rss_after / rss_warm - 1
    REPORT.append(
        f"memory: RSS {rss_warm / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} MiB "
        f"after 300 more mixed requests ({100 * growth:+.1f}%)"
    )
    assert growth <= 0.10, f"RSS grew {100 * growth:.1f}% over 300 requests"
    if gpu_warm > 0:  # CUDA: torch's allocations back to where they were
        assert gpu_after <= gpu_warm * 1.01 + 2**20, (gpu_warm, gpu_after)
    else:
        REPORT.append("memory: torch.cuda.memory_allocated check skipped (no CUDA)")


# ---------------------------------------------------------------------------- disconnects


def raw_post(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST on a raw socket and leave it open (close it to disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def test_a_client_that_disconnects_while_queued_costs_no_compute(server: Any) -> None:
    url = server.url
    runs = metric(url, "depass_engine_duration_seconds_count", operation="attribute")
    skipped = metric(url, "depass_skipped_jobs_total", reason="disconnected")
    slow = in_thread(lambda: httpx.post(f"{url}/v1/attributions", json=SLOW, timeout=120))
    wait_until(lambda: metric(url, "depass_worker_busy") == 1)
    leaver = raw_post(url, "/v1/attributions", QUICK)
    wait_until(lambda: metric(url, "depass_queue_depth_requests") == 1)
    leaver.close()
    wait_until(lambda: metric(url, "depass_skipped_jobs_total", reason="disconnected") > skipped)
    assert slow().status_code == 200
    assert metric(url, "depass_engine_duration_seconds_count", operation="attribute") == runs + 1


# ---------------------------------------------------------------------------- SIGTERM


def test_sigterm_lets_in_flight_requests_finish(model_dir: Path, tmp_path: Path) -> None:
    with LOAD.serve(model_dir, tmp_path / "service.log", OMP_NUM_THREADS="2") as served:
        url = served.url
        running = in_thread(lambda: httpx.post(f"{url}/v1/attributions", json=SLOW, timeout=120))
        wait_until(lambda: metric(url, "depass_worker_busy") == 1)
        queued = in_thread(lambda: httpx.post(f"{url}/v1/attributions", json=QUICK, timeout=120))
        wait_until(lambda: metric(url, "depass_queue_depth_requests") == 1)
        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # new connections are refused while the in-flight requests finish
        wait_until(lambda: _refused(url), timeout_s=10)
        first, second = running(), queued()
        finished = time.monotonic()
        assert first.status_code == 200 and first.json()["granularity"] == "neuron", first.text
        assert second.status_code == 200, second.text
        code = served.process.wait(timeout=60)
        assert code in (0, -signal.SIGTERM), code  # uvicorn re-raises the signal it caught
        log = served.log.read_text()
        assert "Traceback" not in log, log
    REPORT.append(
        f"sigterm: 2 in-flight requests answered 200, {finished - signalled:.1f} s after the "
        "signal; then the process exited"
    )


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.TransportError:
        return True
    return False
