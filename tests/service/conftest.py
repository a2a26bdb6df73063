"""Fixtures of the service tests: in-process apps around a tiny engine, and real servers.

``server`` runs ``python -m service`` under uvicorn on a free port, serving a tiny random
Llama saved to a temporary folder; ``golden_server`` serves the golden tiny Llama of
``../shared/golden`` (skipped when absent). Both are shared by the whole session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from engine import DePassEngine
from engine.testing import tiny_model, word_tokenizer
from service import Settings, create_app
from service.serving import FaultInjector
from tests.service.support import load_test_module

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(os.environ.get("DEPASS_SHARED", REPO.parent / "shared")) / "golden"
PROMPT = "the capital of France is"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(**overrides: Any) -> Settings:
    """Test settings: a named model, no key, unless overridden."""
    values: dict[str, Any] = {"model": "tiny-llama", "api_key": None}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(
    engine: DePassEngine,
    fault_injector: FaultInjector | None = None,
    raise_app_exceptions: bool = True,
    **overrides: Any,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app around ``engine`` with its lifespan running, and an in-process client."""
    app = create_app(settings(**overrides), engine=engine, fault_injector=fault_injector)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield app, client


# ---------------------------------------------------------------------------- real servers


def free_port() -> int:
    """A free loopback port (the load-test driver's)."""
    return load_test_module().free_port()


@contextlib.contextmanager
def serve(model: Path, log: Path, **env: str) -> Iterator[str]:
    """``python -m service`` on a free port until the block ends; yields its base URL.

    The launcher of ``scripts/load_test.py``, with this process's thread count so that
    the server reduces in the same order as the tests.
    """
    threads = str(torch.get_num_threads())
    with load_test_module().serve(model, log, OMP_NUM_THREADS=threads, **env) as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a word tokenizer, saved as a model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def direct_engine(tiny_model_dir: Path) -> DePassEngine:
    """The engine on the same folder the server loads, in this process."""
    return DePassEngine.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real uvicorn process serving ``tiny_model_dir``."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serve(tiny_model_dir, log) as url:
        yield url


@pytest.fixture(scope="session")
def golden_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real uvicorn process serving the golden tiny Llama."""
    model = GOLDEN / "models" / "tiny-llama"
    if not (GOLDEN / "manifest.json").exists() or not model.is_dir():
        pytest.skip(f"golden reference outputs not found at {GOLDEN} (set DEPASS_SHARED)")
    log = tmp_path_factory.mktemp("logs") / "golden.log"
    with serve(model, log) as url:
        yield url


# ---------------------------------------------------------------------------- report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the reliability tests measured (fuzz cases, load, memory)."""
    from tests.service.support import REPORT

    if REPORT:
        terminalreporter.section("DePass Serve reliability figures")
        for line in REPORT:
            terminalreporter.write_line(line)
