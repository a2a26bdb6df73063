"""The load-balancing layer for real: nginx in front of two ``python -m service`` replicas.

nginx runs in the foreground with its own prefix, logs and temp folders under a tmp dir,
on a free loopback port, with docker/nginx/depass.conf.template (the file compose mounts)
rendered the way the official nginx image renders it: envsubst over the ``LB_*``
variables only. The replicas serve the embedded model on loopback ports. The tests check
that requests spread over both replicas, that a replica killed mid-run costs the client no
request (nginx resends to the other one), that a restarted replica gets traffic back, and
that the load balancer's own failures come in the service's error envelope.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILE,
    DOCKERFILE,
    NGINX_TEMPLATE,
    REPO,
    clean_environment,
    find_tool,
    parse_dockerfile,
    settings_defaults,
)

#: Short, so that the test sees a failed replica come back within seconds.
FAIL_TIMEOUT_S = 2
PROMPTS = ("The capital of France is", "Mary gave a book to", "The river is")

NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/depass.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def envsubst(template: str, values: dict[str, str]) -> str:
    """``envsubst '$A $B'``, as the nginx image runs it: only the named variables, in the
    ``$NAME`` and ``${NAME}`` forms; every other ``$`` (nginx's variables) stays."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", replace, template)


@dataclass
class Replica:
    """One ``python -m service`` process on a fixed loopback port (kept across restarts)."""

    port: int
    model: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        environment = clean_environment()
        environment.update(
            DEPASS_MODEL=str(self.model),
            DEPASS_HOST="127.0.0.1",
            DEPASS_PORT=str(self.port),
            DEPASS_DEVICE="cpu",
            DEPASS_LOG_LEVEL="warning",
            DEPASS_GRACEFUL_SHUTDOWN_S="2",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=REPO,
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        """/ready answers 200; raises when the process has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"replica {self.address} exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.address}/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.address} not ready in {timeout_s} s")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, in-flight requests lose their connection."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Cluster:
    url: str
    replicas: tuple[Replica, Replica]
    access_log: Path


def render_nginx(tmp: Path, port: int, upstreams: list[str]) -> Path:
    """The template with its variables filled in, under a main config of the test's own."""
    defaults = settings_defaults()
    values = {
        "LB_LISTEN": f"127.0.0.1:{port}",
        "LB_REPLICA_0": upstreams[0],
        "LB_REPLICA_1": upstreams[1],
        "LB_FAIL_TIMEOUT": f"{FAIL_TIMEOUT_S}s",
        "LB_MAX_BODY_BYTES": str(defaults["max_body_bytes"]),
        "LB_READ_TIMEOUT": f"{int(defaults['request_timeout_s']) + 10}s",
    }
    rendered = envsubst(NGINX_TEMPLATE.read_text(), values)
    left = re.findall(r"\$\{\w+\}", rendered)
    assert not left, f"template variables without a value: {left}"
    (tmp / "depass.conf").write_text(rendered)
    # As root, nginx's workers would drop to an account that cannot enter the test's
    # private tmp dir (bodies and responses over the buffers go to temp files there).
    user = "user root;" if os.geteuid() == 0 else ""
    main = tmp / "nginx.conf"
    main.write_text(NGINX_MAIN.format(tmp=tmp, user=user))
    return main


@contextlib.contextmanager
def nginx_running(nginx: str, tmp: Path, main: Path, port: int) -> Iterator[Path]:
    """nginx in the foreground until the block ends; yields its access log (its stdout)."""
    command = [nginx, "-p", f"{tmp}/", "-c", str(main), "-e", str(tmp / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"nginx -t:\n{checked.stderr}"
    access_log = tmp / "access.log"
    with access_log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (tmp / "error.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "nginx did not open its port"
            time.sleep(0.05)
        yield access_log
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model; a tiny random Llama in a tmp folder when it is not built."""
    embedded = REPO / "models" / "depass-tiny"
    weights = embedded / "model.safetensors"
    if weights.exists() and os.access(weights, os.R_OK):
        return embedded
    from engine.testing import tiny_model, word_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nginx = find_tool("nginx")
    if nginx is None:
        pytest.skip("nginx not found: apt-get install nginx to test the load balancer")
    tmp = tmp_path_factory.mktemp("lb")
    for folder in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / folder).mkdir()
    replicas = (
        Replica(free_port(), model_dir, tmp / "replica-a.log"),
        Replica(free_port(), model_dir, tmp / "replica-b.log"),
    )
    port = free_port()
    main = render_nginx(tmp, port, [r.address for r in replicas])
    try:
        for replica in replicas:
            replica.start()  # both load at once
        for replica in replicas:
            replica.wait_ready()
        with nginx_running(nginx, tmp, main, port) as access_log:
            yield Cluster(f"http://127.0.0.1:{port}", replicas, access_log)
    finally:
        for replica in replicas:
            replica.stop()


@dataclass
class Answer:
    status: int
    upstreams: list[str]  # the replicas nginx tried, the one that answered last
    body: Any

    @property
    def replica(self) -> str:
        return self.upstreams[-1] if self.upstreams else ""


def attribute(url: str, index: int = 0) -> Answer:
    """POST /v1/attributions through the load balancer."""
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "positions": [-1], "outputs": ["scores"]}
    request = urllib.request.Request(
        f"{url}/v1/attributions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    upstreams = [u.strip() for u in (headers.get("X-DePass-Upstream") or "").split(",")]
    return Answer(status, [u for u in upstreams if u], json.loads(raw) if raw else None)


def test_requests_spread_over_both_replicas(cluster: Cluster) -> None:
    a, b = (r.address for r in cluster.replicas)
    answers = [attribute(cluster.url, i) for i in range(10)]
    assert [x.status for x in answers] == [200] * 10
    served = [x.replica for x in answers]
    assert served.count(a) >= 3 and served.count(b) >= 3, served
    assert answers[0].body["object"] == "attribution"
    # The access log names the upstream of every request, for operators.
    log = cluster.access_log.read_text()
    assert f"upstream={a}" in log and f"upstream={b}" in log


def test_killed_replica_costs_no_request_and_gets_traffic_back(cluster: Cluster) -> None:
    a, b = cluster.replicas

    # 40 requests, 4 at a time; replica b is killed (SIGKILL) after the 8th answer, with
    # requests in flight on it and more to come.
    answers: list[Answer | str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(attribute, cluster.url, i) for i in range(40)]
        for count, future in enumerate(as_completed(futures), start=1):
            try:
                answers.append(future.result())
            except Exception as exc:  # a connection error reaching the client
                answers.append(f"{type(exc).__name__}: {exc}")
            if count == 8:
                b.kill()
    failed = [x for x in answers if isinstance(x, str) or x.status != 200]
    assert not failed, f"the client saw failures: {failed}"
    retried = [x.upstreams for x in answers if isinstance(x, Answer) and len(x.upstreams) > 1]
    assert any(u[0] == b.address and u[-1] == a.address for u in retried), (
        f"no request was resent from the killed replica: {retried}"
    )

    # Restart b on its port; traffic keeps flowing meanwhile, and comes back to b once it
    # is ready and nginx's fail_timeout has passed.
    b.start()
    during: list[Answer] = []
    while not b.ready():
        during.append(attribute(cluster.url, len(during)))
        time.sleep(0.1)
    assert during and all(x.status == 200 for x in during), [x.status for x in during]

    deadline = time.monotonic() + 5 * FAIL_TIMEOUT_S
    after: list[Answer] = []
    while not any(x.replica == b.address for x in after):
        assert time.monotonic() < deadline, f"no traffic back to {b.address}: {after}"
        after.append(attribute(cluster.url, len(after)))
        time.sleep(0.05)
    shares = [attribute(cluster.url, i).replica for i in range(10)]
    assert shares.count(a.address) >= 3 and shares.count(b.address) >= 3, shares


def test_body_limit_is_the_services_and_answers_in_its_envelope(cluster: Cluster) -> None:
    limit = settings_defaults()["max_body_bytes"]
    host, port = cluster.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", "/v1/attributions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(limit + 1))
        connection.endheaders()  # nginx answers on the header, before any body
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert str(limit) in body["error"]["message"]


def test_healthcheck_commands_probe_the_service(cluster: Cluster) -> None:
    """The compose and Dockerfile healthchecks run (python -c, no curl) against a replica:
    0 while it answers, not 0 where nothing listens."""
    compose_test = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["depass"]
    compose_test = compose_test["healthcheck"]["test"]
    assert compose_test[:3] == ["CMD", "python", "-c"]
    (check,) = parse_dockerfile(DOCKERFILE.read_text())[-1].all("HEALTHCHECK")
    image_test = json.loads(check.partition(" CMD ")[2])
    assert image_test[:2] == ["python", "-c"]
    alive, dead = cluster.replicas[0].port, free_port()
    for code in (compose_test[3], image_test[2]):
        for port, healthy in ((alive, True), (dead, False)):
            env = {**clean_environment(), "DEPASS_PORT": str(port)}
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, timeout=30
            )
            assert (done.returncode == 0) == healthy, (port, healthy, done.stderr)


def test_no_replica_left_answers_502_in_the_envelope(cluster: Cluster) -> None:
    """Last in the module: it takes both replicas down."""
    for replica in cluster.replicas:
        replica.kill()
    answer = attribute(cluster.url)
    assert answer.status == 502
    assert answer.body["error"]["code"] == "no_replica"
    assert answer.body["error"]["type"] == "unavailable_error"
