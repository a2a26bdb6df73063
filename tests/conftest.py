"""Shared fixtures: tiny random models of every supported family, the golden folder, and
the real pretrained models that ``make real-models`` installs (one load per session)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import DePassEngine
from engine.families import family_called, family_names
from engine.testing import tiny_model, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEPASS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"

sys.path.insert(0, str(REPO / "scripts"))

import real_models  # noqa: E402

torch.set_num_threads(2)

#: Every registered family: the family tests run on each one's declared tiny model
#: (``Family.tiny``), so a family added to engine/families/ is under test with nothing
#: else edited.
FAMILY_NAMES: list[str] = family_names()


def shaped_like(name: str) -> list[str]:
    """The registered families whose parts are those of the family called ``name`` (the
    same module paths and maths under other architecture names), e.g. the families a
    test may reach into with Llama's attribute names."""
    model = family_called(name)
    return [
        other
        for other in FAMILY_NAMES
        if replace(family_called(other), name=model.name, architectures=model.architectures)
        == model
    ]


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family_engine(request: pytest.FixtureRequest) -> DePassEngine:
    """An engine on a tiny random model of each family."""
    return family_engine_for(request.param)


def family_engine_for(family: str, **engine_kwargs) -> DePassEngine:
    """An engine on the tiny random model of ``family`` (its declared tiny config, seed 7)."""
    model = tiny_model(family, seed=7)
    return DePassEngine(model, word_tokenizer(), **engine_kwargs)


@pytest.fixture(scope="session")
def llama_engine() -> DePassEngine:
    """An engine on a tiny random Llama with a word tokenizer."""
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer())


def golden_or_skip() -> Path:
    """The golden folder, or skip the calling test module when ../shared is absent."""
    if not (GOLDEN / "manifest.json").exists():
        pytest.skip(
            f"golden reference outputs not found at {GOLDEN} (set DEPASS_SHARED)",
            allow_module_level=True,
        )
    return GOLDEN


def real_model_path(name: str) -> Path:
    """The GGUF file of a real model of ``scripts/real_models.py``: ``DEPASS_<NAME>_GGUF``
    when set (another copy of the file), else the one ``make real-models`` installs.

    Without it the calling test skips, with the reason, except under CI (``CI`` set),
    which installs the models first: there it fails.
    """
    variable = f"DEPASS_{name.upper()}_GGUF"
    try:
        named = os.environ.get(variable)
        path = Path(named) if named else real_models.gguf_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist ({variable})")
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the real models first (make real-models): {exc}")
        pytest.skip(str(exc))
    return path


def served_attribution(name: str, prompt: str, tmp_path: Path) -> tuple[Path, dict, dict]:
    """Serve the real model ``name`` with ``DEPASS_MODEL=<file>.gguf python -m service``
    over real HTTP: its file, the service's model card, and the JSON attribution of
    ``prompt`` at the last position (answered 200)."""
    import httpx

    from tests.service.support import load_test_module

    path = real_model_path(name)
    with load_test_module().serve(path, tmp_path / "service.log", OMP_NUM_THREADS="2") as served:
        card = httpx.get(f"{served.url}/v1/model", timeout=30).json()
        reply = httpx.post(
            f"{served.url}/v1/attributions",
            json={"prompt": prompt, "positions": [-1], "array_encoding": "list"},
            timeout=300,
        )
    assert reply.status_code == 200, reply.text
    return path, card, reply.json()


@pytest.fixture(scope="session")
def smollm2() -> DePassEngine:
    """SmolLM2-135M-Instruct (a Llama with a chat template), float32 on the CPU."""
    return DePassEngine.from_pretrained(str(real_model_path("smollm2")))


@pytest.fixture(scope="session")
def gemma3() -> DePassEngine:
    """Gemma-3-270M (text), float32 on the CPU, from the dequantised cache."""
    return DePassEngine.from_pretrained(str(real_model_path("gemma3")))
