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

#: family -> extra config: Mistral with a short sliding window, Qwen2 with q/k/v biases,
#: Gemma 2 with a final soft-cap that bites at this scale, Gemma 2/3 with a local layer
#: (window 3) before a global one, GPT-2 with LayerNorm and projection biases.
FAMILY_SETTINGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 3},
    "qwen2": {"bias_std": 0.2},
    "qwen3": {},
    "gemma": {},
    "gemma2": {
        "final_logit_softcapping": 2.0,
        "sliding_window": 3,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3": {"sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {},
    "phi3": {},
    "gpt2": {"bias_std": 0.2},
    "gpt_neox": {"bias_std": 0.2},
}


@pytest.fixture(scope="session", params=sorted(FAMILY_SETTINGS))
def family_engine(request: pytest.FixtureRequest) -> DePassEngine:
    """An engine on a tiny random model of each family."""
    return family_engine_for(request.param)


def family_engine_for(family: str, **engine_kwargs) -> DePassEngine:
    """An engine on the tiny random model of ``family`` (FAMILY_SETTINGS, seed 7)."""
    model = tiny_model(family, seed=7, **FAMILY_SETTINGS[family])
    return DePassEngine(model, word_tokenizer(), **engine_kwargs)


@pytest.fixture(scope="session")
def llama_engine() -> DePassEngine:
    """An engine on a tiny random Llama with a word tokenizer."""
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer())


def golden_or_skip() -> Path:
    """The golden folder, or skip the calling test module when ../shared is absent."""
    if not (GOLDEN / "manifest.json").exists():
        pytest.skip(f"golden reference outputs not found at {GOLDEN} (set DEPASS_SHARED)")
    return GOLDEN
