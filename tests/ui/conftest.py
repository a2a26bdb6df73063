"""Fixtures of the viewer tests: the real service and a real headless Chromium.

``viewer_url`` is ``python -m service`` under uvicorn on a free port, serving the embedded
``models/depass-tiny`` with an API key and a 64-token input limit. The browser is Debian's
``chromium`` (``.ci/run`` installs it), driven by Playwright for Python: no browser is
downloaded. Screenshots go to ``DEPASS_UI_ARTIFACTS`` (default ``build/ui-artifacts``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.support import REPO, load_test_module

MODEL = REPO / "models" / "depass-tiny"
API_KEY = "viewer-test-key"
MAX_INPUT_TOKENS = 64
NAME_MOVER = "When Mary and John went to the store, John gave a drink to"
#: Chromium as root in a container with no network (see the machine notes in .ci/run).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """Debian's chromium, if installed."""
    return os.environ.get("DEPASS_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where the screenshots go (kept after the run as test artefacts)."""
    path = Path(os.environ.get("DEPASS_UI_ARTIFACTS", REPO / "build" / "ui-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def viewer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the real service on the embedded model, with an API key."""
    assert (MODEL / "config.json").is_file(), f"the embedded model is missing: {MODEL}"
    log = tmp_path_factory.mktemp("logs") / "viewer-service.log"
    served = load_test_module().serve(
        MODEL,
        log,
        OMP_NUM_THREADS="2",
        DEPASS_API_KEY=API_KEY,
        DEPASS_MAX_INPUT_TOKENS=str(MAX_INPUT_TOKENS),
    )
    with served as server:
        yield server.url


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """A headless Chromium (Debian's), shared by the viewer tests."""
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()
