"""Causality: the decomposition at a position never depends on later tokens.

For every family, granularity, split rule and execution path (alone, under the smallest
memory budget, so in many chunks, and batched with the other prompt), the components at
positions ``< n`` of a prompt cut after ``n`` tokens equal those of the same prompt
continued, and the components of the later tokens are exactly zero there. A rule that
decides a component's presence from a gate that happens to compute to 0.0 fails this:
whether it does depends on the shapes of the matrix products, so on the prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine import SPLIT_RULES, AttributionRequest, AttributionResult, DePassEngine
from tests.conftest import shaped_like

LONG, CUT = 14, 9  # the prompt continues to LONG tokens; the cut prompt stops at CUT
LIMIT = 1e-5  # relative to the largest state entry at the compared positions

FieldsFor = Callable[[DePassEngine, list[int]], dict[str, Any]]


def projection_subspace(resid: torch.Tensor, layer: int) -> dict[str, Any]:
    """Subspace fields of two parts of ``resid`` (N, D), the residual entering ``layer``:
    along a fixed direction and the rest (a per-position projection, so the parts
    themselves are causal)."""
    direction = torch.nn.functional.normalize(torch.linspace(-1, 1, resid.shape[1]), dim=0)
    along = (resid @ direction)[:, None] * direction
    parts = torch.stack([resid - along, along])
    return {"granularity": "subspace", "start_layer": layer, "subspace": parts}


CASES: dict[str, FieldsFor] = {
    "token": lambda e, ids: {},
    "token_from_1": lambda e, ids: {"start_layer": 1},
    "token_to_middle": lambda e, ids: {"end_layer": 1},
    "token_all_layers": lambda e, ids: {"all_layers": True},
    "token_groups": lambda e, ids: {"groups": [[0], [1, 2], [4, 6]]},
    "module_attn": lambda e, ids: {"granularity": "module", "module": "attn"},
    "module_mlp": lambda e, ids: {"granularity": "module", "module": "mlp"},
    "head_layers": lambda e, ids: {"granularity": "head", "start_layer": [0, 1]},
    "neuron": lambda e, ids: {"granularity": "neuron", "neurons": [5, 0, 31, 7]},
    "subspace": lambda e, ids: projection_subspace(e.trace(ids).resid(1).float(), 1),
}
MODES = ("alone", "chunked", "batched")


def _request(engine: DePassEngine, ids: list[int], case: str, rule: str) -> AttributionRequest:
    return AttributionRequest(
        input_ids=ids,
        mlp_split=rule,
        positions=list(range(CUT)),
        outputs=["states"],
        **CASES[case](engine, ids),
    )


def _smallest_budget_engine(engine: DePassEngine, request: AttributionRequest) -> DePassEngine:
    """An engine on the same model whose budget holds one position per MLP chunk and
    one component per attention block for ``request``."""
    memory = engine.plan(request).memory
    smallest = memory.total - memory.working + memory.working_min
    return DePassEngine(engine.model, engine.tokenizer, memory_budget_bytes=smallest)


def _run(
    engine: DePassEngine, cut: AttributionRequest, full: AttributionRequest, mode: str
) -> tuple[AttributionResult, AttributionResult]:
    if mode == "batched":
        short, long = engine.attribute_many([cut, full])
        assert short.timings["batch_size"] == long.timings["batch_size"] == 2
        return short, long
    if mode == "chunked":
        return (
            _smallest_budget_engine(engine, cut).attribute(cut),
            _smallest_budget_engine(engine, full).attribute(full),
        )
    return engine.attribute(cut), engine.attribute(full)


def assert_causal(short: AttributionResult, long: AttributionResult, what: str) -> None:
    """``long`` (a continued prompt) equals ``short`` at every returned position, on the
    components they share; ``long``'s extra (later-token) components are exactly zero."""
    count = short.states.shape[-2]
    shared, extra = long.states[..., :count, :], long.states[..., count:, :]
    scale = max(float(short.states.abs().max()), 1e-30)
    gap = float((shared - short.states).abs().max()) / scale
    assert gap <= LIMIT, f"{what}: positions < {CUT} moved by {gap:.2e} (relative)"
    assert not extra.any(), f"{what}: a later token's component is non-zero earlier"
    gap = float((long.remainder - short.remainder).abs().max()) / scale
    assert gap <= LIMIT, f"{what}: the remainder moved by {gap:.2e} (relative)"


@pytest.mark.parametrize("rule", SPLIT_RULES)
def test_decomposition_ignores_later_tokens(family_engine: DePassEngine, rule: str) -> None:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(4, family_engine.info.vocab_size, (LONG,), generator=generator).tolist()
    for case in CASES:
        for mode in MODES:
            cut = _request(family_engine, ids[:CUT], case, rule)
            full = _request(family_engine, ids, case, rule)
            short, long = _run(family_engine, cut, full, mode)
            assert_causal(short, long, f"{family_engine.info.family} {case} {rule} {mode}")


def zero_gate_model(family: str) -> torch.nn.Module:
    """A tiny model of ``family`` whose layer-0 gates are exactly 0.0 for present
    components at every position: layer 0's attention writes only the upper half of the
    hidden dimensions and its MLP gate reads only the lower half, so each earlier token's
    component at a later position (its attention output there, non-zero) has gate 0.0 for
    every neuron, while the position's own token sets the true gate."""
    from engine.testing import tiny_model

    model = tiny_model(family, seed=5, bias_std=0.0)
    layer = model.model.layers[0]
    half = model.config.hidden_size // 2
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:half] = 0.0
        layer.mlp.gate_proj.weight[:, half:] = 0.0
    return model


@pytest.mark.parametrize("family", shaped_like("llama"))
def test_decomposition_is_continuous_where_gates_are_exactly_zero(family: str) -> None:
    """Moving layer 0's gate weights by 1e-6 turns the exactly-zero gates of present
    components into gates of ~1e-7 and must move the softmax decomposition (continuous in
    the gates) by about as little. A rule that took a zero gate for an absent component
    hands those components nothing at 0.0 and their full share at 1e-7: a jump (measured
    before the fix: 0.25-0.76 against a largest state entry of 2.4-2.8). ``relu``,
    ``max`` and ``linear`` are discontinuous at a zero or tied gate by definition."""
    rule = "softmax"
    from engine.testing import word_tokenizer

    model = zero_gate_model(family)
    engine = DePassEngine(model, word_tokenizer())
    ids = torch.randint(4, 96, (LONG,), generator=torch.Generator().manual_seed(3)).tolist()
    request = AttributionRequest(input_ids=ids, mlp_split=rule, outputs=["states"])
    before = engine.attribute(request)
    gate = model.model.layers[0].mlp.gate_proj.weight
    with torch.no_grad():
        gate.add_(1e-6 * torch.randn(gate.shape, generator=torch.Generator().manual_seed(9)))
    engine.clear_cache()
    after = engine.attribute(request)
    scale = float(before.states.abs().max())
    assert float((after.states - before.states).abs().max()) <= 1e-3 * scale
    assert float((after.remainder - before.remainder).abs().max()) <= 1e-3 * scale
