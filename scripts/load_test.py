"""Load test: N concurrent clients against a DePass service for T seconds (asyncio + httpx).

    python scripts/load_test.py                       # starts `python -m service` itself
    python scripts/load_test.py --url http://host:8000 --api-key KEY
    make load                                         # 32 clients, 60 s, the embedded model

Without ``--url`` the script serves ``--model`` (default: the embedded ``models/depass-tiny``,
or, when that folder is missing, a random model of its shape saved to a temporary folder)
with ``python -m service`` on a free loopback port, and stops it with SIGTERM at the end.

Every client loops: it sends the next request of a fixed mix (attributions of every
granularity, and generations), waits for the answer, and on a 429 sleeps for its
``Retry-After`` as a well-behaved client does. The report gives the status counts, the
p50/p99 latency and the throughput of the successful requests, and two verdicts:

* no 5xx;
* 429 only when the queue is full: every 429 carries ``Retry-After`` and the ``queue_full``
  code, and while it was in flight the driver itself had at least ``max_queue + 1``
  queued-route requests in flight (the queue's ``max_queue`` waiting ones plus this one).

The exit status is 1 when a verdict fails. ``run_load`` is the same driver for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = REPO / "models" / "depass-tiny"

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "Vinson Massif is located in the continent of",
    "the cat sat on the mat and the dog sat on the",
    "Giuseppe Angeli, who has a citizenship of",
    "In the morning the sun rises in the east and in the evening it sets in the",
]

#: The request mix: (route, body without the prompt), cycled by every client.
MIX: list[tuple[str, dict[str, Any]]] = [
    ("/v1/attributions", {"positions": [-1]}),
    ("/v1/attributions", {"granularity": "head", "start_layer": 1, "positions": [-1]}),
    ("/v1/attributions", {"granularity": "module", "module": "mlp", "start_layer": 0}),
    ("/v1/attributions", {"granularity": "neuron", "start_layer": 0, "neurons": [1, 2, 3]}),
    ("/v1/attributions", {"outputs": ["scores", "states"], "array_dtype": "float16"}),
    ("/v1/generate", {"max_new_tokens": 4}),
]


@dataclass
class LoadReport:
    """What a load run measured."""

    clients: int
    duration_s: float
    max_queue: int
    statuses: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    rejected_429: int = 0
    bad_429: list[str] = field(default_factory=list)  # a 429 that the queue did not justify
    server_errors: int = 0
    transport_errors: int = 0

    @property
    def passed(self) -> bool:
        """No 5xx, no transport error, and every 429 justified."""
        return not (self.server_errors or self.transport_errors or self.bad_429)

    def lines(self) -> list[str]:
        """A short human-readable summary."""
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return [
            f"load: {self.clients} clients for {self.duration_s:.0f} s "
            f"(max_queue {self.max_queue}): {statuses}",
            f"load: {self.ok} ok, {self.throughput_rps:.1f} req/s, latency p50 "
            f"{self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, max {self.max_ms:.0f} ms",
            f"load: 5xx {self.server_errors}, transport errors {self.transport_errors}, "
            f"429 {self.rejected_429} (unjustified {len(self.bad_429)})",
        ]


class _InFlight:
    """Counts the driver's queued-route requests in flight, and for each one the most that
    were in flight at once during its life."""

    def __init__(self) -> None:
        self.now = 0
        self._peaks: dict[int, int] = {}
        self._ids = itertools.count()

    def enter(self) -> int:
        self.now += 1
        ticket = next(self._ids)
        self._peaks[ticket] = self.now
        for key in self._peaks:
            self._peaks[key] = max(self._peaks[key], self.now)
        return ticket

    def leave(self, ticket: int) -> int:
        self.now -= 1
        return self._peaks.pop(ticket)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_load(
    url: str,
    clients: int = 32,
    duration_s: float = 60.0,
    api_key: str | None = None,
    timeout_s: float = 300.0,
) -> LoadReport:
    """Drive ``url`` with ``clients`` concurrent clients for ``duration_s`` seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout_s, limits=limits
    ) as http:
        model = (await http.get("/v1/model")).raise_for_status().json()
        max_queue = int(model["limits"]["max_queue"])
        report = LoadReport(clients=clients, duration_s=duration_s, max_queue=max_queue)
        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        in_flight = _InFlight()
        start = time.monotonic()
        end = start + duration_s

        async def client(index: int) -> None:
            requests = itertools.cycle(
                [
                    (route, {**body, "prompt": PROMPTS[(index + i) % len(PROMPTS)]})
                    for i, (route, body) in enumerate(MIX)
                ]
            )
            for _ in range(index % len(MIX)):  # clients start at different points of the mix
                next(requests)
            while time.monotonic() < end:
                route, body = next(requests)
                ticket = in_flight.enter()
                clock = time.perf_counter()
                try:
                    response = await http.post(route, json=body)
                except httpx.TransportError as exc:
                    in_flight.leave(ticket)
                    statuses[type(exc).__name__] += 1
                    report.transport_errors += 1
                    continue
                elapsed = time.perf_counter() - clock
                peak = in_flight.leave(ticket)
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(elapsed)
                elif response.status_code >= 500:
                    report.server_errors += 1
                elif response.status_code == 429:
                    report.rejected_429 += 1
                    problem = _unjustified_429(response, peak, max_queue)
                    if problem:
                        report.bad_429.append(problem)
                    retry_after = float(response.headers.get("retry-after") or 1)
                    await asyncio.sleep(max(0.0, min(retry_after, end - time.monotonic())))

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed_s = time.monotonic() - start
    report.statuses = dict(statuses)
    report.ok = len(latencies)
    report.throughput_rps = len(latencies) / elapsed_s
    report.p50_ms = 1000 * percentile(latencies, 0.50)
    report.p99_ms = 1000 * percentile(latencies, 0.99)
    report.max_ms = 1000 * max(latencies, default=0.0)
    return report


def _unjustified_429(response: httpx.Response, peak: int, max_queue: int) -> str | None:
    """Why this 429 breaks the contract, or None when it is a queue-full answer."""
    code = response.json().get("error", {}).get("code")
    if code != "queue_full":
        return f"429 with code {code!r}"
    if not response.headers.get("retry-after", "").isdigit():
        return "429 without a Retry-After of whole seconds"
    if peak < max_queue + 1:
        return f"429 while only {peak} requests were in flight (max_queue {max_queue})"
    return None


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_model_folder(folder: Path) -> Path:
    """A random Llama of the embedded model's shape (4 layers, hidden 128, MLP 512) with a
    word tokenizer, saved in ``folder``: for checkouts without ``models/depass-tiny``."""
    sys.path.insert(0, str(REPO))
    from engine.testing import tiny_model, word_tokenizer

    shape = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32}
    tiny_model("llama", seed=3, **shape, **heads).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def default_model(scratch: Path) -> Path:
    """The embedded model when it is there, else a random one of its shape in ``scratch``."""
    if (EMBEDDED_MODEL / "config.json").is_file():
        return EMBEDDED_MODEL
    print(f"load: {EMBEDDED_MODEL} is missing; serving a random model of its shape")
    return tiny_model_folder(scratch / "tiny-llama")


@dataclass
class Server:
    """A ``python -m service`` process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve(model: Path, log: Path, **env: str) -> Iterator[Server]:
    """``python -m service`` on a free loopback port until the block ends (then SIGTERM)."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DEPASS_")}
    environment.update(
        DEPASS_MODEL=str(model),
        DEPASS_HOST="127.0.0.1",
        DEPASS_PORT=str(port),
        DEPASS_DEVICE="cpu",
        DEPASS_DTYPE="float32",
        DEPASS_LOG_LEVEL="warning",
        **env,
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=environment, stdout=sink, stderr=sink
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server, timeout_s=180)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the service exited ({server.process.returncode}):\n{server.log.read_text()}"
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service was not ready in {timeout_s:.0f} s")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("DEPASS_API_KEY"))
    parser.add_argument("--model", type=Path, help="model folder to serve (without --url)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model = args.model or default_model(scratch)
            url = stack.enter_context(serve(model, scratch / "service.log")).url
            print(f"load: serving {model} at {url}")
        report = asyncio.run(run_load(url, args.clients, args.duration, args.api_key))
    for line in report.lines():
        print(line)
    for problem in report.bad_429[:5]:
        print(f"load: unjustified 429: {problem}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    print("load: PASS" if report.passed else "load: FAIL")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
