"""The naive DePass baseline (benchmarks/naive.py) against the reference outputs in shared/golden.

Parity: token-level states of the parity models match the reference to 3e-5 absolute.
Conservation: for every MLP rule, and on the biased Qwen2 too, the token components plus the
remainder add up to the model's final normed hidden state.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(
    os.environ.get("DEPASS_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)
GOLDEN = SHARED / "golden"

if not (GOLDEN / "manifest.json").exists():
    pytest.skip(
        f"golden reference outputs not found at {GOLDEN} (set DEPASS_SHARED to the shared folder)",
        allow_module_level=True,
    )

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import naive  # noqa: E402

PARITY_MODELS = ("tiny-llama", "tiny-qwen2-nobias")
CONSERVATION_MODELS = ("tiny-llama", "tiny-qwen2-nobias", "tiny-qwen2")
#: golden call kind -> naive arguments (start_layer, mlp_split)
PARITY_KINDS: dict[str, tuple[int, str]] = {
    "last_layer_softmax": (0, "softmax"),
    "last_layer_max": (0, "max"),
    "last_layer_taylor": (0, "taylor"),
    "middle_to_last_s2": (2, "softmax"),
}
PARITY_ATOL = 3e-5
CONSERVATION_RTOL = 1e-4

MANIFEST: dict[str, Any] = json.loads((GOLDEN / "manifest.json").read_text())


def _entry(model_name: str, prompt_index: int, kind: str) -> dict[str, Any]:
    """The manifest entry of one golden file."""
    name = f"{model_name}__p{prompt_index}__{kind}.npz"
    for entry in MANIFEST["files"]:
        if entry["file"] == name:
            return entry
    raise KeyError(name)


def _prompt_ids(model_name: str, prompt_index: int) -> list[int]:
    """Input ids of a prompt for a model, as the manifest records them."""
    return list(_entry(model_name, prompt_index, "states")["input_ids"])


@functools.cache
def _model(model_name: str) -> torch.nn.Module:
    """A golden tiny model (folder named like the model key), eager attention, float32."""
    path = GOLDEN / "models" / model_name
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


PROMPTS = range(len(MANIFEST["prompts"]))


@pytest.mark.parametrize("kind", sorted(PARITY_KINDS))
@pytest.mark.parametrize("prompt_index", PROMPTS)
@pytest.mark.parametrize("model_name", PARITY_MODELS)
def test_matches_reference(model_name: str, prompt_index: int, kind: str) -> None:
    """Naive token states equal the reference's attribute_state within 3e-5."""
    entry = _entry(model_name, prompt_index, kind)
    start_layer, mlp_split = PARITY_KINDS[kind]
    states, _ = naive.naive_token_decomposition(
        _model(model_name), entry["input_ids"], start_layer=start_layer, mlp_split=mlp_split
    )
    golden = np.load(GOLDEN / entry["file"])["attribute_state"]
    assert states.shape == golden.shape
    diff = float(np.abs(states.numpy() - golden).max())
    assert diff <= PARITY_ATOL, f"{entry['file']}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("start_layer", [0, 2])
@pytest.mark.parametrize("mlp_split", naive.MLP_SPLITS)
@pytest.mark.parametrize("prompt_index", PROMPTS)
@pytest.mark.parametrize("model_name", CONSERVATION_MODELS)
def test_conserves(model_name: str, prompt_index: int, mlp_split: str, start_layer: int) -> None:
    """Token components plus remainder add up to the final normed hidden state."""
    model = _model(model_name)
    ids = _prompt_ids(model_name, prompt_index)
    states, remainder = naive.naive_token_decomposition(
        model, ids, start_layer=start_layer, mlp_split=mlp_split
    )
    with torch.no_grad():
        target = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    err = float((states.sum(1) + remainder - target).abs().max())
    scale = float(target.abs().max())
    assert err <= CONSERVATION_RTOL * scale, f"error {err:.3e} vs max abs target {scale:.3e}"


def _hook_counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Forward and forward-pre hook counts of every module (transformers adds its own)."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_hooks_removed() -> None:
    """The capture pass leaves no hooks of its own behind on the model."""
    model = _model("tiny-llama")
    before = _hook_counts(model)
    naive.naive_token_decomposition(model, _prompt_ids("tiny-llama", 0))
    assert _hook_counts(model) == before
