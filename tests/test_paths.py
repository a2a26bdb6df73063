"""The fast paths (chunking under a memory budget, causal skipping, reordered groups,
the trace cache) give the same numbers as the plain path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import AttributionRequest, DePassEngine
from engine.granularity import token_start
from engine.memory import MemoryBudgetError
from engine.propagate import Member, Propagator, SplitSettings
from engine.testing import tiny_model, word_tokenizer

PROMPT = "when Mary and John went to the store John gave a drink to Mary"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("qwen2", seed=11, num_hidden_layers=3)


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
def test_smallest_budget_chunks_and_matches_large_budget(
    model: torch.nn.Module, fields: dict[str, Any], rule: str
) -> None:
    """A budget that leaves room for one component per attention block and one position
    per MLP chunk splits the work into many more pieces; the result must not change, and
    one byte less is refused before any model work."""
    fields = {"prompt": PROMPT, "mlp_split": rule, "outputs": ["states", "scores"], **fields}
    request = AttributionRequest(**fields)
    big = DePassEngine(model, word_tokenizer(), memory_budget_bytes=1 << 32)
    memory = big.plan(request).memory
    smallest = memory.total - memory.working + memory.working_min
    small = DePassEngine(model, word_tokenizer(), memory_budget_bytes=smallest)
    calls: dict[str, int] = {"big": 0, "small": 0}

    def counter(name: str) -> Any:
        def should_stop() -> bool:
            calls[name] += 1
            return False

        return should_stop

    want = big.attribute(request, should_stop=counter("big"))
    got = small.attribute(request, should_stop=counter("small"))
    assert calls["small"] > calls["big"]  # polled once per MLP chunk: more chunks
    torch.testing.assert_close(got.states, want.states, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.remainder, want.remainder, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=2e-6)
    too_small = DePassEngine(model, word_tokenizer(), memory_budget_bytes=smallest - 1)
    with pytest.raises(MemoryBudgetError, match="prompt: needs an estimated"):
        too_small.plan(request)


@pytest.mark.parametrize("rule", ["softmax", "max", "relu"])
def test_causal_skipping_matches_full_computation(model: torch.nn.Module, rule: str) -> None:
    """Token components declared live from position 0 (no skipping) give the same states."""
    engine = DePassEngine(model, word_tokenizer())
    trace = engine.trace(engine.tokenize(PROMPT))
    n_layers = engine.info.num_layers
    positions = torch.arange(trace.num_tokens)
    split = SplitSettings(rule=rule, first_token_rule=True)
    results = []
    for skip in (True, False):
        start = token_start(trace.resid(0), 0, engine.token_texts(trace.input_ids.tolist()), None)
        if not skip:  # declared live everywhere: the general attention path, no skipping
            start.first_position = [0] * len(start.first_position)
            start.single_position = False
        member = Member(start=start, length=trace.num_tokens, positions=positions)
        propagator = Propagator(model, engine.family, [trace], torch.float32, 1 << 30)
        propagator.run([member], split, n_layers)
        results.append(member.snapshots[-1].values)
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


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "token"},
        {"granularity": "token", "all_layers": True},
        {"granularity": "head", "start_layer": [0, 2]},
        {"granularity": "module", "module": "attn", "start_layer": 2},
        {"granularity": "token", "end_layer": 2},
    ],
    ids=["token", "all-layers", "heads", "module-last-layer", "end-layer"],
)
def test_last_layer_at_kept_positions_matches_every_position(
    model: torch.nn.Module, fields: dict[str, Any]
) -> None:
    """Asking for a few positions skips the last layer's work elsewhere; the states there
    equal those of the run that computes every position."""
    engine = DePassEngine(model, word_tokenizer())
    full = engine.attribute(AttributionRequest(prompt=PROMPT, outputs=["states"], **fields))
    picked = [-1, 3, 0]
    some = engine.attribute(
        AttributionRequest(prompt=PROMPT, outputs=["states"], positions=picked, **fields)
    )
    index = [full.positions.index(p % len(full.positions)) for p in picked]
    torch.testing.assert_close(some.states, full.states[..., index, :, :], rtol=0, atol=2e-6)
    torch.testing.assert_close(some.remainder, full.remainder[..., index, :], rtol=0, atol=2e-6)
    assert some.relative_conservation_error <= 1e-5


def test_compiled_split_matches_eager(model: torch.nn.Module) -> None:
    """compile=True fuses the softmax split with torch.compile; the numbers are the eager
    ones up to float rounding, for whole-prompt and late-starting components alike."""
    eager = DePassEngine(model, word_tokenizer())
    fused = DePassEngine(model, word_tokenizer(), compile=True)
    for fields in ({"granularity": "token"}, {"granularity": "head", "start_layer": [0, 1]}):
        request = AttributionRequest(prompt=PROMPT, outputs=["states", "scores"], **fields)
        want, got = eager.attribute(request), fused.attribute(request)
        torch.testing.assert_close(got.states, want.states, rtol=0, atol=2e-6)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=2e-6)
        assert got.relative_conservation_error <= 1e-5


@pytest.mark.parametrize(
    ("compute", "matmul", "tolerance"),
    [
        (torch.float32, torch.bfloat16, 1.5e-2),  # a GPU's default: bf16 tensor-core products
        (torch.bfloat16, torch.bfloat16, 3e-2),  # components kept in bf16 (long prompts)
    ],
    ids=["bf16-matmul", "bf16-components"],
)
def test_mixed_precision_stays_close_and_conserves(
    model: torch.nn.Module, compute: torch.dtype, matmul: torch.dtype, tolerance: float
) -> None:
    """bfloat16 products (and components) change the numbers at bfloat16's rounding only;
    the split stays float32 and the components still add up to the state."""
    exact = DePassEngine(model, word_tokenizer())
    mixed = DePassEngine(model, word_tokenizer(), compute_dtype=compute, matmul_dtype=matmul)
    for fields in ({"granularity": "token"}, {"granularity": "head", "start_layer": [0, 2]}):
        request = AttributionRequest(prompt=PROMPT, outputs=["states", "scores"], **fields)
        want, got = exact.attribute(request), mixed.attribute(request)
        assert got.states.dtype == compute
        scale = float(want.scores.abs().max())
        assert float((got.scores.float() - want.scores).abs().max()) <= tolerance * scale
        assert got.relative_conservation_error <= tolerance


def test_one_forward_pass_serves_every_start_layer(model: torch.nn.Module) -> None:
    """A request over several start layers traces its prompt once, even with no cache."""
    engine = DePassEngine(model, word_tokenizer(), trace_cache_size=0)
    calls: list[int] = []
    original = engine.traces.get_many

    def counting(prompts: Any) -> Any:
        calls.append(len(prompts))
        return original(prompts)

    engine.traces.get_many = counting  # type: ignore[method-assign]
    request = AttributionRequest(prompt=PROMPT, granularity="head", start_layer=[0, 1, 2])
    result = engine.attribute(request)
    assert calls == [1] and result.layers == [0, 1, 2]
