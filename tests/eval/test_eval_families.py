"""The evaluation suite on a tiny model of every registered family.

``depass_eval`` reads the engine's facts and finds every module through the family's
parts, so each family the engine supports runs each protocol's per-prompt work: the token
protocol with every baseline, and the component protocol's head and neuron rankings and
maskings, under both rules. The hooks are checked against edits of the weights themselves:
zeroing neurons is zeroing their output weights (a mixture's: a whole expert, the shared
expert's columns), and a set of neurons' gradient x activation is the logit's derivative
by a scale on their output weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from depass_eval import perturb
from depass_eval.baselines import BASELINES
from depass_eval.hooks import gradient_x_activation, masked_logits
from depass_eval.model import EvalModel
from depass_eval.protocols import components, tokens
from depass_eval.runner import Context
from depass_eval.source import LocalDePass
from engine.families import FAMILIES
from engine.parts import DenseMLP
from engine.testing import tiny_model, word_tokenizer

#: Every registered family, by its short name.
FAMILY_NAMES = sorted({family.name for family in FAMILIES.values()})
CASE = {"id": "0", "prompt": "the capital city of France is", "answer": "Paris"}
OTHER_PROMPT = "Mary gave the book to John in the park and then she went to"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: the tiny models' products are too small to share (and a busy machine's
    second thread only waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def model(request: pytest.FixtureRequest) -> EvalModel:
    return EvalModel.of(tiny_model(request.param), word_tokenizer(), request.param)


def _context(model: EvalModel, tmp_path: Path, **options: object) -> Context:
    return Context(model, LocalDePass(engine=model.engine), tmp_path, seed=0, options=options)


def test_every_family_is_covered() -> None:
    """The matrix is the registry: a family registered is a family evaluated."""
    assert len(FAMILY_NAMES) >= 14 and {"gpt2", "gpt_neox", "mixtral"} <= set(FAMILY_NAMES)


def test_facts_are_the_engines(model: EvalModel) -> None:
    """Shapes come from the engine's facts, neuron widths per layer from the family (a
    mixture's: every expert's neurons and a shared expert's)."""
    info = model.engine.info
    assert (model.num_layers, model.num_heads, model.head_dim, model.hidden_size) == (
        info.num_layers,
        info.num_heads,
        info.head_dim,
        info.hidden_size,
    )
    widths = [model.neuron_width(layer) for layer in range(model.num_layers)]
    assert max(widths) == info.intermediate_size
    for layer, width in enumerate(widths):
        assert model.neuron_columns(layer).shape == (model.hidden_size, width)


def test_residuals_enter_each_layer(model: EvalModel) -> None:
    """The residual entering layer l is what the model's hidden states hold there (GPT-2's
    includes its position embeddings)."""
    prompts = [model.encode(CASE["prompt"]), model.encode(OTHER_PROMPT)]
    layers = list(range(model.num_layers))
    every = model.residuals_at(prompts, layers)  # (L, B, D) from the hidden states
    for layer in layers:
        torch.testing.assert_close(model.residual(prompts, layer), every[layer])
        torch.testing.assert_close(model.residual_all(prompts[1], layer)[-1], every[layer, 1])


def test_token_protocol_with_every_baseline(model: EvalModel, tmp_path: Path) -> None:
    ctx = _context(model, tmp_path, splits=["softmax"], ig_steps=2, baselines=list(BASELINES))
    row = tokens.evaluate(ctx, CASE)
    expected = {"depass-softmax", "depass-softmax-abs", *BASELINES}
    assert set(row["scores"]) == expected and set(row["curves"]) == expected
    for method, scores in row["scores"].items():
        assert len(scores) == len(row["tokens"]) and np.isfinite(scores).all(), method
        assert len(row["curves"][method]["patch"]) == len(perturb.PERCENTS)
    assert np.isfinite(row["ig_convergence_delta"])


@pytest.mark.parametrize("rules", ["strict", "paper"])
def test_component_protocol_ranks_and_masks(model: EvalModel, tmp_path: Path, rules: str) -> None:
    """Heads of every layer and the neurons of the ranked layers (both layers of the tiny
    models), each method's top k zeroed."""
    ctx = _context(model, tmp_path, rules=rules, head_ks=[1, 3], neuron_ks=[1, 20])
    row = components.evaluate(ctx, CASE)
    layers = components.neuron_layers(ctx)
    assert layers == list(range(model.num_layers)) == row["neuron_layers"]
    neurons = sum(model.neuron_width(layer) for layer in layers)
    heads = model.num_layers * model.num_heads
    if rules == "paper":
        ks = {"heads": [heads], "neurons": [neurons]}  # the top 1% of each
        ks = {kind: [components.one_percent(n) for n in ks[kind]] for kind in ks}
        methods = components.PAPER_METHODS
        assert isinstance(row["generated"], str)
    else:
        ks = {"heads": [1, 3], "neurons": [1, 20]}
        methods = {kind: components.METHODS for kind in components.KINDS}
    for kind in components.KINDS:
        assert set(row["masking"][kind]) == set(methods[kind])
        for entry in row["masking"][kind].values():
            assert entry["k"] == ks[kind] and len(entry["prob"]) == len(ks[kind])
            assert all(0.0 <= p <= 1.0 for p in entry["prob"])
    for labels in row["top_heads"].values():
        assert len(labels) == min(5, heads) and all(label.startswith("L") for label in labels)


# ---------------------------------------------------------------------------- hooks


@torch.no_grad()
def _output_weights(model: EvalModel, layer: int) -> list[tuple[range, torch.Tensor]]:
    """Runs of neurons of ``layer`` and a view of the weights that write them (the test's
    own reading of each MLP's layout, apart from the engine's): a dense MLP's first four
    output columns (GPT-2's Conv1D stores them as rows); a mixture's expert 1 whole, and
    the shared expert's first four columns."""
    block = model.block(layer)
    part = model.family.mlp.for_layer(block)
    if isinstance(part, DenseMLP):
        weight = block.get_submodule(part.down).weight
        return [(range(4), weight[:4] if part.transposed else weight[:, :4])]
    down = block.get_submodule(part.experts).down_proj  # (E, D, I)
    experts, size = down.shape[0], down.shape[2]
    runs = [(range(size, 2 * size), down[1])]
    if part.shared is not None:
        shared = block.get_submodule(part.shared.down).weight  # (D, I_s)
        runs.append((range(experts * size, experts * size + 4), shared[:, :4]))
    return runs


@contextmanager
def _scaled(weights: torch.Tensor, factor: float) -> Iterator[None]:
    """``weights`` multiplied by ``factor`` inside the block, restored after."""
    saved = weights.detach().clone()
    with torch.no_grad():
        weights.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            weights.copy_(saved)


def test_zeroing_neurons_is_zeroing_their_output_weights(model: EvalModel) -> None:
    ids = model.encode(OTHER_PROMPT)
    layer = model.num_layers - 1
    plain = model.last_logits([ids])[0]
    for run, weights in _output_weights(model, layer):
        neuron_keep = {layer: torch.ones(2, model.neuron_width(layer))}
        neuron_keep[layer][1, list(run)] = 0.0
        head_keep = torch.ones(2, model.num_layers, model.num_heads)
        logits = masked_logits(model, ids, head_keep, neuron_keep)
        with _scaled(weights, 0.0):
            expected = model.last_logits([ids])[0]
        assert (expected - plain).abs().max() > 1e-4  # the neurons matter
        torch.testing.assert_close(logits[0], plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.last_logits([ids])[0], plain)  # hooks removed


def test_gradient_x_activation_is_the_derivative_of_a_weight_scale(model: EvalModel) -> None:
    """A set of neurons' summed gradient x activation is d logit / d s at s = 1, where s
    scales their output weights (central difference)."""
    ids = model.encode(OTHER_PROMPT)
    target = model.answer_id("Mary")
    layer = model.num_layers - 1
    heads, neurons = gradient_x_activation(model, ids, target, [layer])
    assert heads.shape == (model.num_layers, model.num_heads) and torch.isfinite(heads).all()
    assert neurons[layer].shape == (model.neuron_width(layer),)
    step = 1e-2
    for run, weights in _output_weights(model, layer):
        logit = {}
        for sign in (1, -1):
            with _scaled(weights, 1 + sign * step):
                logit[sign] = float(model.last_logits([ids])[0, target])
        derivative = (logit[1] - logit[-1]) / (2 * step)
        assert float(neurons[layer][list(run)].sum()) == pytest.approx(
            derivative, rel=1e-2, abs=1e-4
        )
