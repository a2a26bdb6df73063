"""The service on Ray Serve (``depass_ray.serve``) answers as it does under uvicorn.

Both serve the embedded model with a queue of one request: the Serve application is
built from ``deploy/serve-cpu.yaml``'s arguments on the session's Ray cluster, uvicorn
runs ``python -m service``. The same attribution, the same 4xx envelopes, 429 with
``Retry-After`` once the queue is full, and the same metrics. The config files and the
KubeRay manifest are checked in ``tests/deploy/test_deploy_ray.py``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.service.support import load_test_module

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "depass-tiny"
#: Both servers: one request queued beside the one running, one at a time.
LIMITS = {"max_queue": 1, "max_batch": 1}
BODY = {"prompt": "the cat sat on the", "positions": [-1, -2], "array_encoding": "list"}
#: About two seconds of work on the embedded model: several of these fill the queue.
SLOW = {
    "prompt": " ".join(["the cat sat on the mat"] * 10),
    "granularity": "neuron",
    "start_layer": 0,
    "neurons": list(range(512)),
    "positions": [-1],
}


@pytest.fixture(scope="module")
def serve_url(ray_cluster: str) -> Iterator[str]:
    """The Serve application of deploy/serve-cpu.yaml (with LIMITS) on 127.0.0.1."""
    from ray import serve

    from depass_ray.serve import app_builder

    config = yaml.safe_load((REPO / "deploy" / "serve-cpu.yaml").read_text())
    application = config["applications"][0]
    args = application["args"]
    args["settings"] = {**args["settings"], **LIMITS}
    port = load_test_module().free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name=application["name"], route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def uvicorn_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m service`` on the embedded model with LIMITS."""
    env = {f"DEPASS_{k.upper()}": str(v) for k, v in LIMITS.items()}
    log = tmp_path_factory.mktemp("uvicorn") / "service.log"
    with load_test_module().serve(TINY, log, OMP_NUM_THREADS="1", **env) as server:
        yield server.url


def without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "timings"}


def test_the_same_attribution(serve_url: str, uvicorn_url: str) -> None:
    served = httpx.post(f"{serve_url}/v1/attributions", json=BODY, timeout=120)
    direct = httpx.post(f"{uvicorn_url}/v1/attributions", json=BODY, timeout=120)
    assert served.status_code == direct.status_code == 200, served.text
    assert without_timings(served.json()) == without_timings(direct.json())
    assert served.json()["scores"]["encoding"] == "list"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/attributions", {"prompt": "hi", "granularity": "bogus"}, 422),
        ("POST", "/v1/attributions", {"prompt": "hi", "start_layer": 99}, 422),
        ("POST", "/v1/attributions", {"prompt": "hi", "input_ids": [1]}, 422),
        ("GET", "/v1/nothing", None, 404),
    ],
)
def test_the_same_errors(
    serve_url: str, uvicorn_url: str, method: str, path: str, body: Any, status: int
) -> None:
    served = httpx.request(method, f"{serve_url}{path}", json=body, timeout=60)
    direct = httpx.request(method, f"{uvicorn_url}{path}", json=body, timeout=60)
    assert served.status_code == direct.status_code == status, served.text
    assert served.json() == direct.json()
    assert set(served.json()) == {"error"}


def burst(url: str, count: int = 6) -> list[httpx.Response]:
    """``count`` slow attributions at once."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(httpx.post, f"{url}/v1/attributions", json=SLOW, timeout=120)
            for _ in range(count)
        ]
        return [f.result() for f in futures]


def test_a_full_queue_gets_the_services_429(serve_url: str, uvicorn_url: str) -> None:
    for url in (serve_url, uvicorn_url):
        replies = burst(url)
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, (url, statuses)
        for refused in (r for r in replies if r.status_code == 429):
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full"), error
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["x-should-retry"] == "true"


def metric_names(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {family.name for family in text_string_to_metric_families(text)}


def test_the_same_metrics(serve_url: str, uvicorn_url: str) -> None:
    names = metric_names(serve_url)
    assert names == metric_names(uvicorn_url)
    assert "depass_requests" in names
    text = httpx.get(f"{serve_url}/metrics", timeout=30).text
    assert 'code="429"' in text or 'status="429"' in text
