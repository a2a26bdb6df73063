"""Reverse mode: the taylor scores of one backward pass equal the forward strategy's.

For every family and granularity (token, groups, module attn/mlp, head, neuron, subspace),
start and end layers, lists of layers, several positions and targets, on tiny random
models and on the real SmolLM2-135M and Gemma-3-270M weights: the same scores, remainder
and logits as carrying every component forward, to 1e-5 of the largest score. And the
properties any correct engine has: causality, a conservation check that a wrong frozen
operator fails, refusals that name ``strategy``, and ``top_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine import AttributionRequest, AttributionResult, DePassEngine, RequestError
from tests.test_causality import projection_subspace

LIMIT = 1e-5  # relative to the largest |score| of the request
IDS = [1, 5, 9, 12, 7, 30, 22, 8, 14, 3, 17]

Fields = Callable[[DePassEngine], dict[str, Any]]

CASES: dict[str, Fields] = {
    "token_every_position": lambda e: {},
    "token_targets": lambda e: {"targets": [3, 7, 11], "positions": [-1, 4, 0]},
    "token_groups": lambda e: {"groups": [[1, 2], [4]], "positions": [-1, 6]},
    "token_from_1": lambda e: {"start_layer": 1, "positions": [-1]},
    "token_to_middle": lambda e: {"end_layer": 1, "positions": [-1, 5]},
    "module_attn_layers": lambda e: {
        "granularity": "module",
        "module": "attn",
        "start_layer": list(range(e.info.num_layers)),
        "positions": [-1],
    },
    "module_mlp": lambda e: {"granularity": "module", "module": "mlp", "positions": [-2, -1]},
    "head_every_layer": lambda e: {
        "granularity": "head",
        "start_layer": list(range(e.info.num_layers)),
        "positions": [-1, 2],
        "targets": [4, 9],
    },
    "neuron_all": lambda e: {"granularity": "neuron", "positions": [-1]},
    "neuron_named_layers": lambda e: {
        "granularity": "neuron",
        "start_layer": list(range(e.info.num_layers)),
        "neurons": [0, 5, 7],
        "positions": [-1, 3],
    },
    "subspace": lambda e: {
        **projection_subspace(e.trace(IDS).resid(1).float(), 1),
        "positions": [-1],
    },
}


def _both(engine: DePassEngine, **fields: Any) -> tuple[AttributionResult, AttributionResult]:
    forward = engine.attribute(
        AttributionRequest(input_ids=IDS, mlp_split="taylor", strategy="forward", **fields)
    )
    reverse = engine.attribute(
        AttributionRequest(input_ids=IDS, mlp_split="taylor", strategy="reverse", **fields)
    )
    return forward, reverse


def assert_same_scores(forward: AttributionResult, reverse: AttributionResult) -> None:
    """Reverse gives forward's labels, scores, remainder and logits (to LIMIT)."""
    assert forward.strategy == "forward" and reverse.strategy == "reverse"
    assert reverse.components == forward.components
    assert reverse.layer_components == forward.layer_components
    assert reverse.first_positions == forward.first_positions
    assert reverse.position_targets == forward.position_targets
    assert forward.scores is not None and reverse.scores is not None
    assert reverse.scores.shape == forward.scores.shape
    scale = float(forward.scores.abs().max())
    for name in ("scores", "remainder_scores", "logits"):
        got, want = getattr(reverse, name), getattr(forward, name)
        error = float((got - want).abs().max()) / scale
        assert error < LIMIT, f"{name}: {error:.2e} of the largest score"
    assert reverse.relative_conservation_error < LIMIT


@pytest.mark.parametrize("case", sorted(CASES))
def test_reverse_equals_forward(family_engine: DePassEngine, case: str) -> None:
    forward, reverse = _both(family_engine, **CASES[case](family_engine))
    assert_same_scores(forward, reverse)


def test_scores_add_up_to_the_logit(llama_engine: DePassEngine) -> None:
    """Components plus remainder give the model's own logit at every position."""
    result = llama_engine.attribute(
        AttributionRequest(input_ids=IDS, mlp_split="taylor", strategy="reverse", targets=[6])
    )
    assert result.scores is not None and result.remainder_scores is not None
    total = result.scores.sum(1) + result.remainder_scores  # (P, T)
    model = llama_engine.model(torch.tensor([IDS])).logits[0, :, 6]
    torch.testing.assert_close(total[:, 0], model.float(), atol=1e-4, rtol=1e-5)


def test_a_wrong_frozen_operator_shows_in_conservation(llama_engine: DePassEngine) -> None:
    """Conservation compares the frozen map's state with the model's: corrupt one frozen
    quantity (a layer's attention probabilities) and the error shows, though the scores
    still add up to the (now wrong) logits."""
    fields = {"input_ids": IDS, "mlp_split": "taylor", "strategy": "reverse", "positions": [-1]}
    llama_engine.clear_cache()
    good = llama_engine.attribute(AttributionRequest(**fields))
    trace = llama_engine.trace(IDS)  # the cached trace the next request reuses
    trace.layers[1].probs.mul_(0.5)
    try:
        bad = llama_engine.attribute(AttributionRequest(**fields))
    finally:
        llama_engine.clear_cache()
    assert good.relative_conservation_error < LIMIT
    assert bad.relative_conservation_error > 1e-2


@pytest.mark.parametrize("granularity", ["token", "head", "neuron"])
def test_causality(family_engine: DePassEngine, granularity: str) -> None:
    """The scores at a position do not depend on the tokens after it."""
    cut = 7
    fields: dict[str, Any] = {"granularity": granularity, "mlp_split": "taylor"}
    fields |= {"strategy": "reverse", "targets": [2, 9], "positions": [3, cut - 1]}
    long = family_engine.attribute(AttributionRequest(input_ids=IDS, **fields))
    short = family_engine.attribute(AttributionRequest(input_ids=IDS[:cut], **fields))
    assert long.scores is not None and short.scores is not None
    width = short.scores.shape[1]  # token runs: the cut prompt has fewer components
    scale = float(long.scores.abs().max())
    error = float((long.scores[:, :width] - short.scores).abs().max()) / scale
    assert error < LIMIT
    if granularity == "token":  # later tokens score exactly zero there
        assert float(long.scores[:, width:].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"mlp_split": "softmax"}, "mlp_split='taylor'"),
        ({"mlp_split": "taylor", "outputs": ["scores", "states"]}, "states"),
        ({"mlp_split": "taylor", "all_layers": True}, "all_layers"),
    ],
)
def test_reverse_is_refused_where_it_does_not_apply(fields: dict, why: str) -> None:
    with pytest.raises(RequestError) as caught:
        AttributionRequest(prompt="a b", strategy="reverse", **fields)
    assert caught.value.field == "strategy"
    assert why in str(caught.value)


def test_auto_picks_reverse_where_it_applies_and_costs_less(llama_engine: DePassEngine) -> None:
    def chosen(**fields: Any) -> str:
        return llama_engine.plan(AttributionRequest(input_ids=IDS, **fields)).strategy

    assert chosen(mlp_split="taylor", positions=[-1]) == "reverse"
    heads = {"granularity": "head", "start_layer": [0, 1], "positions": [-1]}
    assert chosen(mlp_split="taylor", **heads) == "reverse"
    assert chosen(mlp_split="softmax", positions=[-1]) == "forward"  # no reverse form
    assert chosen(mlp_split="taylor", outputs=["states"]) == "forward"
    # every position scored: one backward pass per position costs more than carrying
    # the token components forward once
    assert chosen(mlp_split="taylor", granularity="module", module="mlp") == "forward"


def test_every_neuron_of_every_layer(llama_engine: DePassEngine) -> None:
    """``neuron`` with a list of layers and no ``neurons``: every neuron of each layer,
    labelled ``L{l}.N{i}``, the component axis labelled without the layer."""
    layers = list(range(llama_engine.info.num_layers))
    result = llama_engine.attribute(
        AttributionRequest(
            input_ids=IDS,
            granularity="neuron",
            start_layer=layers,
            mlp_split="taylor",
            positions=[-1],
        )
    )
    width = llama_engine.info.intermediate_size
    assert result.strategy == "reverse" and result.layers == layers
    assert result.scores is not None and result.scores.shape == (len(layers), 1, width + 1, 1)
    assert result.components[:3] == ["rest", "N0", "N1"]
    assert result.layer_components is not None
    assert result.layer_components[1][1:3] == ["L1.N0", "L1.N1"]


def test_top_k_keeps_the_largest(llama_engine: DePassEngine) -> None:
    fields = {"input_ids": IDS, "granularity": "neuron", "mlp_split": "taylor"}
    fields |= {"positions": [-1], "start_layer": 1}
    every = llama_engine.attribute(AttributionRequest(**fields))
    top = llama_engine.attribute(AttributionRequest(**fields, top_k=5))
    assert every.scores is not None and top.scores is not None
    assert top.kept_top_k == 5 and top.scores.shape == (1, 5, 1)
    row = every.scores[0, :, 0]
    largest = row.abs().topk(5).indices.sort().values.tolist()
    assert top.components == [every.components[i] for i in largest]
    torch.testing.assert_close(top.scores[0, :, 0], row[largest])
    torch.testing.assert_close(top.logits, every.logits)


def test_top_k_is_refused_with_states() -> None:
    with pytest.raises(RequestError) as caught:
        AttributionRequest(prompt="a b", top_k=3, outputs=["states"])
    assert caught.value.field == "top_k"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_weights(name: str, request: pytest.FixtureRequest) -> None:
    """On real pretrained weights: tokens at two positions, the heads of two layers and
    every neuron of one layer, reverse against forward."""
    engine: DePassEngine = request.getfixturevalue(name)
    prompt = "The capital of France is Paris, and the capital of Italy is"
    last = engine.info.num_layers - 1
    for fields in (
        {"positions": [-1, 3]},
        {"granularity": "head", "start_layer": [0, last], "positions": [-1]},
        {"granularity": "neuron", "start_layer": last - 1, "positions": [-1]},
    ):
        both = [
            engine.attribute(
                AttributionRequest(prompt=prompt, mlp_split="taylor", strategy=s, **fields)
            )
            for s in ("forward", "reverse")
        ]
        assert_same_scores(*both)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_long_prompt_trace_recomputes_probabilities(family: str) -> None:
    """A request whose trace with every layer's probabilities would not fit runs on a
    trace without them (each layer's recomputed by the model's attention module, the
    backward pass checkpointed) and gives the same scores."""
    from tests.conftest import family_engine_for

    fields = {"input_ids": IDS, "mlp_split": "taylor", "strategy": "reverse"}
    fields |= {"granularity": "head", "start_layer": [0, 1], "positions": [-1, 4]}
    roomy = family_engine_for(family)
    full_plan = roomy.plan(AttributionRequest(**fields))
    assert not full_plan.light_trace
    tight = family_engine_for(family, memory_budget_bytes=full_plan.memory.total - 1)
    plan = tight.plan(AttributionRequest(**fields))
    assert plan.light_trace and plan.memory.total < full_plan.memory.total
    want = roomy.attribute(AttributionRequest(**fields))
    got = tight.attribute(AttributionRequest(**fields))
    assert len(tight.traces) == 0  # a trace without probabilities is not cached
    assert_same_scores(
        roomy.attribute(AttributionRequest(**{**fields, "strategy": "forward"})), got
    )
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)


def test_the_time_estimate_of_a_reverse_run(llama_engine: DePassEngine) -> None:
    """A reverse run's work grows as N (N^2 in the mixing), not N^2 x components, and a
    forward taylor request refused for time is told that reverse would fit."""
    from engine import TimeBudgetError, cost

    def plan(n: int, strategy: str) -> Any:
        fields = {"mlp_split": "taylor", "strategy": strategy, "positions": [-1]}
        return llama_engine.plan(AttributionRequest(input_ids=[5] * n, **fields))

    work = {n: cost.plan_work(llama_engine.shape, plan(n, "reverse")) for n in (100, 200)}
    assert 1.8 < work[200].decompose / work[100].decompose < 2.2
    assert 3.5 < work[200].mixing / work[100].mixing < 4.5
    forward = llama_engine.estimate_seconds(plan(200, "forward"))
    reverse = llama_engine.estimate_seconds(plan(200, "reverse"))
    assert reverse < forward / 10
    with pytest.raises(TimeBudgetError) as caught:
        llama_engine.check_time(plan(200, "forward"), (forward + reverse) / 4, "input_ids")
    assert "strategy='reverse'" in caught.value.message


def test_neurons_of_the_last_layer_need_no_attention_probabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scoring the last layer's neurons reads only that layer's MLP and the read-out: on a
    trace without probabilities none is recomputed (the attention operator is frozen when
    first used), and the scores are those of the full trace."""
    from engine.capture import LayerTrace
    from tests.conftest import family_engine_for

    fields = {"input_ids": IDS, "mlp_split": "taylor", "strategy": "reverse"}
    fields |= {"granularity": "neuron", "start_layer": 1, "positions": [-1, 4]}
    roomy = family_engine_for("llama")
    full_plan = roomy.plan(AttributionRequest(**fields))
    want = roomy.attribute(AttributionRequest(**fields))
    tight = family_engine_for("llama", memory_budget_bytes=full_plan.memory.total - 1)
    assert tight.plan(AttributionRequest(**fields)).light_trace
    calls: list[int] = []
    recompute = LayerTrace.attention_probs

    def counted(self: LayerTrace) -> torch.Tensor:
        calls.append(1)
        return recompute(self)

    monkeypatch.setattr(LayerTrace, "attention_probs", counted)
    got = tight.attribute(AttributionRequest(**fields))
    assert calls == []
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)
