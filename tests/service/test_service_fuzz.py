"""Property-based API fuzzing with schemathesis, from the service's own OpenAPI document.

The schema is the one the app serves at ``/openapi.json``. Every operation gets generated
cases (schemathesis's explicit-example, coverage and fuzzing phases; schema-valid and
schema-invalid data) sent over real HTTP to the app under uvicorn on a loopback port,
around a tiny model in this process. Every response must:

* not be a 5xx;
* have a documented status code, content type and headers;
* match the documented schema for its status (the error envelope included);
* reject data that breaks the schema with a 4xx.

``DEPASS_FUZZ_EXAMPLES`` sets the examples per operation: 100 by default (about 900 cases,
sized for CI); ``make fuzz`` runs 1000 per operation. The case count is printed at the end
of the run.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import checks

from engine import DePassEngine
from engine.testing import tiny_model, word_tokenizer
from service import create_app
from tests.service.conftest import free_port
from tests.service.conftest import settings as service_settings
from tests.service.support import REPORT

API_KEY = "fuzz-key-0123456789"
EXAMPLES = int(os.environ.get("DEPASS_FUZZ_EXAMPLES", "100"))
#: The least number of cases the CI-sized run must generate over all operations.
MIN_CASES = 500
SETTINGS = service_settings(
    api_key=API_KEY, max_input_tokens=64, max_new_tokens=8, request_timeout_s=30
)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]

schema = schemathesis.openapi.from_dict(create_app(SETTINGS).openapi())
OPERATIONS = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The app around a tiny model, under uvicorn on a free loopback port."""
    engine = DePassEngine(tiny_model("llama", seed=3), word_tokenizer())
    app = create_app(SETTINGS, engine=engine)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fuzz-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case, base_url: str, session: requests.Session
) -> None:
    response = case.call_and_validate(
        base_url=base_url,
        session=session,
        headers={"Authorization": f"Bearer {API_KEY}"},
        checks=CHECKS,
        timeout=60,
    )
    CASES[f"{case.operation.method.upper()} {case.operation.path}"] += 1
    STATUSES[response.status_code] += 1


def test_fuzzing_covered_every_endpoint_with_enough_cases() -> None:
    """Runs after the fuzz test above (file order); skipped when it was deselected."""
    if set(CASES) != OPERATIONS:
        pytest.skip("the fuzz test did not run on every operation (deselected?)")
    total = sum(CASES.values())
    per_route = ", ".join(f"{op} {n}" for op, n in sorted(CASES.items()))
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items()))
    REPORT.append(
        f"schemathesis: {total} cases ({EXAMPLES} examples per operation), 0 failures; "
        f"statuses {statuses}"
    )
    REPORT.append(f"schemathesis: per operation: {per_route}")
    assert total >= (MIN_CASES if EXAMPLES >= 100 else 1), total
    assert all(n >= 1 for n in CASES.values())
