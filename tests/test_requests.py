"""Bad requests fail with an error that names the field, before any work is done."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine import AttributionRequest, DePassEngine, RequestError, UnsupportedArchitectureError

PROMPT = "the capital of France is"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": PROMPT, "input_ids": [1, 2]}, "input_ids"),
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, -2]}, "input_ids"),
        ({"prompt": PROMPT, "granularity": "layer"}, "granularity"),
        ({"prompt": PROMPT, "start_layer": -1}, "start_layer"),
        ({"prompt": PROMPT, "start_layer": [0, 1]}, "start_layer"),
        ({"prompt": PROMPT, "granularity": "head", "start_layer": []}, "start_layer"),
        ({"prompt": PROMPT, "granularity": "head", "start_layer": [1, 1]}, "start_layer"),
        ({"prompt": PROMPT, "granularity": "module"}, "module"),
        ({"prompt": PROMPT, "module": "attn"}, "module"),
        ({"prompt": PROMPT, "granularity": "module", "module": "ffn"}, "module"),
        ({"prompt": PROMPT, "neurons": [1]}, "neurons"),
        ({"prompt": PROMPT, "groups": [[0, 1], [1]]}, "groups"),
        ({"prompt": PROMPT, "groups": [[]]}, "groups"),
        ({"prompt": PROMPT, "granularity": "subspace"}, "subspace"),
        ({"prompt": PROMPT, "granularity": "subspace", "subspace": np.zeros((2, 3))}, "subspace"),
        (
            {"prompt": PROMPT, "granularity": "subspace", "subspace": np.full((1, 2, 3), np.nan)},
            "subspace",
        ),
        ({"prompt": PROMPT, "mlp_split": "gelu"}, "mlp_split"),
        ({"prompt": PROMPT, "temperature": 0}, "temperature"),
        ({"prompt": PROMPT, "temperature": float("nan")}, "temperature"),
        ({"prompt": PROMPT, "temperature": float("inf")}, "temperature"),
        ({"prompt": PROMPT, "temperature": 1e-39}, "temperature"),
        ({"prompt": PROMPT, "all_layers": True, "granularity": "head"}, "all_layers"),
        ({"prompt": PROMPT, "outputs": []}, "outputs"),
        ({"prompt": PROMPT, "targets": []}, "targets"),
        ({"prompt": PROMPT, "outputs": ["logits"]}, "outputs"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as caught:
        AttributionRequest(**fields)
    assert caught.value.field == field or field in caught.value.message
    assert field in str(caught.value)


def test_unknown_field_is_named() -> None:
    with pytest.raises(TypeError, match="layer"):
        AttributionRequest(prompt=PROMPT, layer=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"start_layer": 3}, "start_layer"),  # token runs accept 0..L (L = 2)
        ({"granularity": "head", "start_layer": 2}, "start_layer"),
        ({"granularity": "head", "start_layer": [0, 5]}, "start_layer"),
        ({"start_layer": 1, "end_layer": 0}, "end_layer"),
        ({"end_layer": 3}, "end_layer"),
        ({"granularity": "module", "module": "mlp", "start_layer": 1, "end_layer": 1}, "end_layer"),
        ({"granularity": "neuron", "neurons": [48]}, "neurons"),
        ({"granularity": "neuron", "neurons": [1, 1]}, "neurons"),
        ({"groups": [[0], [9]]}, "groups"),
        ({"positions": [6]}, "positions"),  # 6 tokens with the BOS
        ({"positions": [-7]}, "positions"),
        ({"targets": [96]}, "targets"),
        ({"targets": ["zebra-crossing"]}, "targets"),
        ({"targets": ["qqqzzz"]}, "targets"),  # one word, known only as <unk>
        ({"granularity": "subspace", "subspace": np.zeros((1, 5, 32))}, "subspace"),
        ({"granularity": "subspace", "subspace": np.zeros((1, 6, 31))}, "subspace"),
    ],
)
def test_model_dependent_errors_name_the_field(
    llama_engine: DePassEngine, fields: dict[str, Any], field: str
) -> None:
    request = AttributionRequest(prompt=PROMPT, **fields)
    with pytest.raises(RequestError) as caught:
        llama_engine.attribute(request)
    assert caught.value.field == field
    assert str(caught.value).startswith(field)


@pytest.mark.parametrize("prompt", ["   ", "\n", "<s>"])
def test_a_prompt_of_special_tokens_only_is_refused(
    llama_engine: DePassEngine, prompt: str
) -> None:
    """Blank text tokenizes to the BOS alone, as "" would with nothing to attribute."""
    with pytest.raises(RequestError, match="special tokens only") as caught:
        llama_engine.plan(AttributionRequest(prompt=prompt))
    assert caught.value.field == "prompt"


def test_a_repeated_head_layer_is_refused_before_any_work(llama_engine: DePassEngine) -> None:
    """It used to pass plan() and fail after the compute with a bare KeyError."""
    with pytest.raises(RequestError, match="layer 1 twice") as caught:
        llama_engine.attribute(
            AttributionRequest(prompt=PROMPT, granularity="head", start_layer=[0, 1, 1])
        )
    assert caught.value.field == "start_layer"


def test_token_run_may_start_at_the_output_residual(llama_engine: DePassEngine) -> None:
    result = llama_engine.attribute(AttributionRequest(prompt=PROMPT, start_layer=2))
    assert result.relative_conservation_error <= 1e-6
    # Nothing mixes after layer L: each position is its own token's.
    assert float(result.scores[-1, :-1].abs().max()) == 0.0


def test_out_of_vocabulary_ids(llama_engine: DePassEngine) -> None:
    with pytest.raises(RequestError) as caught:
        llama_engine.attribute(AttributionRequest(input_ids=[1, 500]))
    assert caught.value.field == "input_ids"


def test_the_unknown_token_itself_is_a_target(llama_engine: DePassEngine) -> None:
    result = llama_engine.attribute(AttributionRequest(prompt=PROMPT, targets=["<unk>"]))
    assert result.targets == [0]


def test_string_targets_resolve_to_single_tokens(llama_engine: DePassEngine) -> None:
    result = llama_engine.attribute(AttributionRequest(prompt=PROMPT, targets=["Paris", 5]))
    assert result.target_tokens[0] == "Paris"
    assert result.targets[1] == 5


def test_unsupported_architecture_lists_supported() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError) as caught:
        DePassEngine(model)
    message = str(caught.value)
    assert "BloomForCausalLM" in message
    for name in ("LlamaForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel"):
        assert name in message


def test_sdpa_model_is_refused() -> None:
    from engine.testing import tiny_model

    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager"):
        DePassEngine(model)
