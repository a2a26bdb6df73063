"""Helpers of the reliability tests: the load-test driver, process memory, metrics, a report.

``REPORT`` collects the figures the tests measure (fuzz case count, load latency, memory);
``tests/service/conftest.py`` prints them at the end of the run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
REPORT: list[str] = []


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response has ``status`` and the one error envelope (naming ``param``)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"], error
    return error


def attribution_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    """A raw ASGI scope of ``POST /v1/attributions``, for tests that drive the app's
    receive/send channels themselves (disconnects, reads the body must not happen)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/attributions",
        "raw_path": b"/v1/attributions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }


def load_test_module() -> ModuleType:
    """``scripts/load_test.py``, the driver ``make load`` runs, as a module."""
    return load_script("load_test.py", "depass_load_test")


def load_script(filename: str, name: str) -> ModuleType:
    """``scripts/<filename>`` as the module ``name`` (loaded once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / filename)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a running service's ``/metrics`` (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
