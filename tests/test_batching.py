"""Batched requests (attribute_many) give the results each request gets alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import AttributionRequest, DePassEngine
from engine.testing import tiny_model, word_tokenizer

PROMPTS = [
    "when Mary and John went to the store John gave a drink to Mary",
    "the cat sat on the mat",
    "a b c",
    "John went to the store and Mary gave a drink",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_model(request.param, seed=5, bias_std=0.2, num_hidden_layers=3)


def _same(got: Any, want: Any) -> None:
    assert got.components == want.components
    assert got.positions == want.positions and got.targets == want.targets
    for name in ("states", "remainder", "scores", "remainder_scores", "logits"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert got.relative_conservation_error <= 1e-5


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "token", "outputs": ["states", "scores"]},
        {"granularity": "token", "positions": [-1], "targets": [3, 4], "mlp_split": "relu"},
        {"granularity": "token", "all_layers": True, "outputs": ["states"]},
        {"granularity": "head", "start_layer": [0, 2], "outputs": ["states", "scores"]},
        {"granularity": "neuron", "start_layer": 1, "neurons": [0, 3, 7]},
        {"granularity": "module", "module": "mlp", "start_layer": 0, "mlp_split": "linear"},
    ],
    ids=["token", "token-last", "all-layers", "heads", "neurons", "module"],
)
def test_batch_equals_one_by_one(model: torch.nn.Module, fields: dict[str, Any]) -> None:
    """Prompts of different lengths (padded in the batch) give their own results."""
    engine = DePassEngine(model, word_tokenizer())
    requests = [AttributionRequest(prompt=p, **fields) for p in PROMPTS]
    alone = [engine.attribute(r) for r in requests]
    together = engine.attribute_many(requests)
    assert [r.timings["batch_size"] for r in together] == [len(PROMPTS)] * len(PROMPTS)
    assert all(r.timings["batch_size"] == 1 for r in alone)
    for got, want in zip(together, alone, strict=True):
        _same(got, want)


def test_mixed_requests_batch_by_compatibility(model: torch.nn.Module) -> None:
    """Different settings, groups with different first-token layouts, and a request too
    big to batch are all answered in order, each equal to its lone result."""
    engine = DePassEngine(model, word_tokenizer(), batch_max_cells=200)
    requests = [
        AttributionRequest(prompt=PROMPTS[0], groups=[[0], [1, 2], [5]]),
        AttributionRequest(prompt=PROMPTS[1], groups=[[0, 1], [3]]),  # first token not alone
        AttributionRequest(prompt=PROMPTS[2]),
        AttributionRequest(prompt=PROMPTS[1], mlp_split="max"),
        AttributionRequest(prompt=PROMPTS[3]),
        AttributionRequest(prompt=" ".join(PROMPTS)),  # (M + 1) N > 200: alone
    ]
    together = engine.attribute_many(requests)
    sizes = [r.timings["batch_size"] for r in together]
    assert sizes == [4, 4, 4, 1, 4, 1]
    for got, request in zip(together, requests, strict=True):
        _same(got, engine.attribute(request))


def test_batches_respect_the_memory_budget(model: torch.nn.Module) -> None:
    """With room for the largest request alone, it runs alone; the short ones that fit
    together still share a batch, and all give their lone results."""
    requests = [AttributionRequest(prompt=p) for p in PROMPTS]
    probe = DePassEngine(model, word_tokenizer())
    tight = probe.plan(requests[0]).working_bytes()  # PROMPTS[0] is the longest
    assert all(probe.plan(r).working_bytes() <= tight for r in requests)
    engine = DePassEngine(model, word_tokenizer(), memory_budget_bytes=tight)
    results = engine.attribute_many(requests)
    assert results[0].timings["batch_size"] == 1
    assert [r.timings["batch_size"] for r in results[1:3]] == [2, 2]  # short ones fit together
    for got, request in zip(results, requests, strict=True):
        _same(got, probe.attribute(request))


def test_batch_of_one_setting_disables_batching(model: torch.nn.Module) -> None:
    engine = DePassEngine(model, word_tokenizer(), max_batch=1)
    results = engine.attribute_many([AttributionRequest(prompt=p) for p in PROMPTS])
    assert [r.timings["batch_size"] for r in results] == [1] * len(PROMPTS)
