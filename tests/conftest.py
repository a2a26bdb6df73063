"""Shared fixtures: tiny random models of every supported family, and the golden folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine import DePassEngine
from engine.testing import tiny_model, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEPASS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"

torch.set_num_threads(2)

#: family -> extra config: Mistral with a short sliding window, Qwen2 with q/k/v biases.
FAMILY_SETTINGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 3},
    "qwen2": {"bias_std": 0.2},
    "qwen3": {},
}


@pytest.fixture(scope="session", params=sorted(FAMILY_SETTINGS))
def family_engine(request: pytest.FixtureRequest) -> DePassEngine:
    """An engine on a tiny random model of each family."""
    model = tiny_model(request.param, seed=7, **FAMILY_SETTINGS[request.param])
    return DePassEngine(model, word_tokenizer())


@pytest.fixture(scope="session")
def llama_engine() -> DePassEngine:
    """An engine on a tiny random Llama with a word tokenizer."""
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer())


def golden_or_skip() -> Path:
    """The golden folder, or skip the calling test module when ../shared is absent."""
    if not (GOLDEN / "manifest.json").exists():
        pytest.skip(f"golden reference outputs not found at {GOLDEN} (set DEPASS_SHARED)")
    return GOLDEN
