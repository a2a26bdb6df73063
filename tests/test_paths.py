"""The fast paths (chunking under a memory budget, causal skipping, reordered groups,
the trace cache) give the same numbers as the plain path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import AttributionRequest, DePassEngine
from engine.granularity import token_start
from engine.propagate import Propagator, SplitSettings
from engine.testing import tiny_model, word_tokenizer

PROMPT = "when Mary and John went to the store John gave a drink to Mary"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("qwen2", seed=11, bias_std=0.2, num_hidden_layers=3)


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "token"},
        {"granularity": "token", "groups": [[5, 6], [0], [2, 1], [9]]},
        {"granularity": "head", "start_layer": [0, 2]},
        {"granularity": "neuron", "start_layer": 1},
        {"granularity": "module", "module": "attn", "start_layer": 1},
    ],
    ids=["token", "groups", "heads", "neurons", "module"],
)
@pytest.mark.parametrize("rule", ["softmax", "linear", "taylor"])
def test_tiny_budget_matches_large_budget(
    model: torch.nn.Module, fields: dict[str, Any], rule: str
) -> None:
    """A 1 KiB budget forces one component per attention block and one position per MLP
    chunk; the result must not change."""
    fields = {"prompt": PROMPT, "mlp_split": rule, "outputs": ["states", "scores"], **fields}
    big = DePassEngine(model, word_tokenizer(), memory_budget_bytes=1 << 32)
    small = DePassEngine(model, word_tokenizer(), memory_budget_bytes=1 << 10)
    want = big.attribute(AttributionRequest(**fields))
    got = small.attribute(AttributionRequest(**fields))
    torch.testing.assert_close(got.states, want.states, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.remainder, want.remainder, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=2e-6)


@pytest.mark.parametrize("rule", ["softmax", "max", "relu"])
def test_causal_skipping_matches_full_computation(model: torch.nn.Module, rule: str) -> None:
    """Token components declared live from position 0 (no skipping) give the same states."""
    engine = DePassEngine(model, word_tokenizer())
    trace = engine.trace(engine.tokenize(PROMPT))
    n_layers = engine.info.num_layers
    positions = torch.arange(trace.num_tokens)
    split = SplitSettings(rule=rule, ignore_first=True)
    results = []
    for skip in (True, False):
        start = token_start(trace.resid(0), 0, engine.token_texts(trace.input_ids.tolist()), None)
        if not skip:
            start.first_position = torch.zeros_like(start.first_position)
        propagator = Propagator(model, engine.adapter, trace, torch.float32, 1 << 30)
        results.append(propagator.run(start, split, n_layers, positions)[-1].values)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-6)


def test_groups_equal_sums_of_token_components(model: torch.nn.Module) -> None:
    """Groups of one token each, given out of order, equal the plain token run."""
    engine = DePassEngine(model, word_tokenizer())
    n = len(engine.tokenize(PROMPT))
    singles = [[k] for k in reversed(range(n))]
    token = engine.attribute(AttributionRequest(prompt=PROMPT, outputs=["states"]))
    grouped = engine.attribute(
        AttributionRequest(prompt=PROMPT, groups=singles, outputs=["states"])
    )
    order = list(reversed(range(n)))
    torch.testing.assert_close(grouped.states, token.states[:, order], rtol=0, atol=1e-6)
    assert grouped.components == [token.components[k] for k in order]


def test_trace_cache_reuses_forward_pass(model: torch.nn.Module) -> None:
    engine = DePassEngine(model, word_tokenizer(), trace_cache_size=2)
    ids = engine.tokenize(PROMPT)
    first = engine.trace(ids)
    assert engine.trace(ids) is first
    engine.trace(ids[:-1])
    engine.trace(ids[:-2])  # evicts the oldest
    assert engine.trace(ids) is not first


def test_from_pretrained_round_trip(tmp_path: Path, model: torch.nn.Module) -> None:
    """A saved model folder loads by path with eager attention and gives the same result."""
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = DePassEngine.from_pretrained(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.info.family == "qwen2"
    assert loaded.info.num_layers == 3
    request = AttributionRequest(prompt=PROMPT, outputs=["scores"])
    want = DePassEngine(model, word_tokenizer()).attribute(request)
    got = loaded.attribute(request)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)


def test_bfloat16_weights_conserve_in_float32_compute(
    tmp_path: Path, model: torch.nn.Module
) -> None:
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    engine = DePassEngine.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert engine.info.dtype == "bfloat16"
    result = engine.attribute(AttributionRequest(prompt=PROMPT, outputs=["states"]))
    assert result.states.dtype == torch.float32
    # bfloat16's own forward pass is the truth here: its rounding bounds the error.
    assert result.relative_conservation_error <= 2e-2


@pytest.mark.parametrize(
    "fields",
    [
        {"outputs": ["scores"]},
        {"outputs": ["states", "scores"], "targets": [3, 4]},
        {"outputs": ["states"], "all_layers": True, "positions": [-1, 2]},
        {"granularity": "token", "groups": [[1, 2], [4]], "outputs": ["states"]},
        {"granularity": "head", "start_layer": [0, 1], "outputs": ["states", "scores"]},
        {"granularity": "neuron", "start_layer": 2, "neurons": [0, 5], "outputs": ["states"]},
    ],
)
def test_plan_predicts_result_size(model: torch.nn.Module, fields: dict[str, Any]) -> None:
    """The size estimate made before any model work equals the arrays returned."""
    engine = DePassEngine(model, word_tokenizer())
    request = AttributionRequest(prompt=PROMPT, **fields)
    plan = engine.plan(request)
    result = engine.attribute(request)
    arrays = [result.states, result.remainder, result.scores, result.remainder_scores]
    arrays.append(result.logits)
    actual = sum(a.numel() * a.element_size() for a in arrays if a is not None)
    assert plan.result_bytes() == actual
    assert plan.components == len(result.components)


def test_device_map_gives_the_same_attribution(tmp_path: Path, model: torch.nn.Module) -> None:
    """A model loaded with an explicit per-layer device map (all on the CPU here; GPUs in
    production) gives the same result as the model loaded whole."""
    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    layers = {f"model.layers.{i}": "cpu" for i in range(3)}
    device_map = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}
    device_map["model.rotary_emb"] = "cpu"
    split = DePassEngine.from_pretrained(str(tmp_path), device_map=device_map)
    whole = DePassEngine.from_pretrained(str(tmp_path))
    for fields in ({"granularity": "token"}, {"granularity": "head", "start_layer": [0, 2]}):
        request = AttributionRequest(prompt=PROMPT, outputs=["states", "scores"], **fields)
        want, got = whole.attribute(request), split.attribute(request)
        torch.testing.assert_close(got.states, want.states, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)


def test_offloading_device_map_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}
    device_map.update({"lm_head": "cpu", "model.rotary_emb": "cpu"})
    with pytest.raises(ValueError, match="must be resident"):
        DePassEngine.from_pretrained(
            str(tmp_path),
            device_map=device_map,
            model_kwargs={"offload_folder": str(tmp_path / "offload")},
        )


def test_trace_cache_byte_limit(model: torch.nn.Module) -> None:
    engine = DePassEngine(model, word_tokenizer(), trace_cache_size=8)
    ids = engine.tokenize(PROMPT)
    one = engine.trace(ids).nbytes()
    engine = DePassEngine(model, word_tokenizer(), trace_cache_size=8, trace_cache_bytes=2 * one)
    first = engine.trace(ids)
    engine.trace(ids[:-1])
    assert engine.trace(ids) is first  # two traces fit
    engine.trace(ids[:-2])
    engine.trace(ids[:-3])
    assert engine.trace(ids) is not first  # the oldest went out
    alone = DePassEngine(model, word_tokenizer(), trace_cache_bytes=1)
    big = alone.trace(ids)
    assert alone.trace(ids) is big  # the newest trace stays even above the limit
    disabled = DePassEngine(model, word_tokenizer(), trace_cache_size=0)
    assert disabled.trace(ids) is not disabled.trace(ids)


def test_should_stop_cancels_between_units_of_work(model: torch.nn.Module) -> None:
    from engine import Cancelled

    engine = DePassEngine(model, word_tokenizer())
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        engine.attribute(AttributionRequest(prompt=PROMPT), should_stop=stop_after_three)
    assert len(calls) == 4
    # The engine is unharmed: the next request runs to the end.
    result = engine.attribute(AttributionRequest(prompt=PROMPT), should_stop=lambda: False)
    assert result.relative_conservation_error <= 1e-5
