"""Conservation: components + remainder add up to the true state, for every granularity,
split rule and architecture (tiny random Llama, Mistral with a sliding window, Qwen2 with
non-zero q/k/v biases, Qwen3 with q/k norms), and scores add up to the model's logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import SPLIT_RULES, AttributionRequest, DePassEngine

PROMPT = "the capital of France is Paris and the capital of Italy is Rome"
LIMIT = 1e-4  # relative, float32

GRANULARITIES: dict[str, dict[str, Any]] = {
    "token": {"granularity": "token"},
    "token_from_1": {"granularity": "token", "start_layer": 1},
    "token_to_middle": {"granularity": "token", "start_layer": 0, "end_layer": 1},
    "token_groups": {"granularity": "token", "groups": [[0], [1, 2, 3], [5, 7]]},
    "token_all_layers": {"granularity": "token", "all_layers": True},
    "module_attn": {"granularity": "module", "module": "attn", "start_layer": 0},
    "module_mlp": {"granularity": "module", "module": "mlp", "start_layer": 0},
    "head": {"granularity": "head", "start_layer": 0},
    "head_layers": {"granularity": "head", "start_layer": [0, 1]},
    "neuron": {"granularity": "neuron", "start_layer": 0},
    "neuron_subset": {"granularity": "neuron", "start_layer": 0, "neurons": [3, 1, 40]},
}


def subspace_fields(engine: DePassEngine, layer: int) -> dict[str, Any]:
    """Two random-direction parts of the residual entering ``layer``, plus a third that
    leaves a remainder (so the remainder path is exercised)."""
    trace = engine.trace(engine.tokenize(PROMPT))
    resid = trace.resid(layer).float()
    direction = torch.nn.functional.normalize(torch.randn(resid.shape[1]), dim=0)
    along = (resid @ direction)[:, None] * direction
    return {
        "granularity": "subspace",
        "start_layer": layer,
        "subspace": torch.stack([resid - along, 0.5 * along]),
    }


@pytest.mark.parametrize("rule", SPLIT_RULES)
@pytest.mark.parametrize("case", [*sorted(GRANULARITIES), "subspace"])
def test_conserves(family_engine: DePassEngine, case: str, rule: str) -> None:
    fields = subspace_fields(family_engine, 1) if case == "subspace" else GRANULARITIES[case]
    result = family_engine.attribute(
        AttributionRequest(prompt=PROMPT, mlp_split=rule, outputs=["states", "scores"], **fields)
    )
    assert result.relative_conservation_error <= LIMIT
    # Independent re-check from the returned arrays: sum of parts + remainder = true state.
    trace = family_engine.trace(result.input_ids)
    total = result.states.sum(-2) + result.remainder
    if result.layers is not None and fields.get("all_layers"):
        for index, layer in enumerate(result.layers):
            true = trace.resid(layer)
            assert torch.allclose(total[index], true, atol=LIMIT * true.abs().max())
    elif fields.get("end_layer") is None:
        true = trace.normed_final
        final = total if result.layers is None else total[-1]
        assert torch.allclose(final, true, atol=LIMIT * true.abs().max())
    # Scores + the remainder's score = the logit (lens) of each target.
    summed = result.scores.sum(-2) + result.remainder_scores
    assert torch.allclose(summed, result.logits, atol=1e-5 * result.logits.abs().max())


def test_scores_add_up_to_model_logit(family_engine: DePassEngine) -> None:
    result = family_engine.attribute(AttributionRequest(prompt=PROMPT, positions=[-1]))
    trace = family_engine.trace(result.input_ids)
    logit = trace.last_logits[result.targets[0]]
    total = result.scores[0, :, 0].sum() + result.remainder_scores[0, 0]
    assert abs(float(total - logit)) <= 1e-4 * max(1.0, abs(float(logit)))
    assert result.targets == [int(trace.last_logits.argmax())]


def test_causal_components_are_zero_before_their_token(llama_engine: DePassEngine) -> None:
    result = llama_engine.attribute(AttributionRequest(prompt=PROMPT, outputs=["states"]))
    states = result.states  # (P, M, D)
    for k in range(states.shape[1]):
        assert torch.count_nonzero(states[:k, k]) == 0
        assert torch.count_nonzero(states[k, k]) > 0


def test_bias_goes_to_remainder_not_to_tokens() -> None:
    from engine.testing import tiny_model, word_tokenizer

    biased = DePassEngine(tiny_model("qwen2", seed=1, bias_std=0.3), word_tokenizer())
    plain = DePassEngine(tiny_model("qwen2", seed=1, bias_std=0.0), word_tokenizer())
    fields = {"prompt": PROMPT, "outputs": ["states"]}
    with_bias = biased.attribute(AttributionRequest(**fields))
    without = plain.attribute(AttributionRequest(**fields))
    assert float(with_bias.remainder.abs().max()) > 1e-2
    assert float(without.remainder.abs().max()) == 0.0
    assert with_bias.relative_conservation_error <= LIMIT
