"""Every family's declaration of parts, checked on its tiny random model (conftest.py).

Conservation for every granularity and split rule is in test_conservation.py; here: the
captured forward pass is the model's own, the components' MLP pre-activations add up to
the true ones (what a parallel block run as sequential, or a pre-norm read from the wrong
module, breaks while conservation may still hold), decompositions are causal, the
registry is open, and the checks have teeth: a declaration with one part wrong fails.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from engine import AttributionRequest, DePassEngine
from engine.families import FAMILIES, Family, family_called, family_for, family_named, register
from engine.granularity import token_start
from engine.parts import (
    FrozenMLP,
    FusedAttention,
    GatedMLP,
    LayerNorm,
    MixtureMLP,
    ProjectionWeights,
    RMSNorm,
)
from engine.propagate import Member, Propagator, SplitSettings
from tests.conftest import FAMILY_NAMES, family_engine_for, shaped_like

PROMPT = "the capital of France is Paris and the capital of Italy is Rome"


def test_captured_forward_is_the_models(family_engine: DePassEngine) -> None:
    """The hooked pass returns the model's own logits; scores add up to the unembedding's
    (pre-cap) logit, and the capped logit is the model's output."""
    ids = family_engine.tokenize(PROMPT)
    trace = family_engine.trace(ids)
    with torch.inference_mode():
        plain = family_engine.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(trace.last_output_logits, plain, rtol=0, atol=1e-5)
    result = family_engine.attribute(AttributionRequest(input_ids=ids, positions=[-1]))
    target = result.targets[0]
    assert float(result.logits[0, 0]) == pytest.approx(float(trace.last_logits[target]), abs=1e-4)
    cap = family_engine.info.logit_softcap
    assert result.logit_softcap == cap
    if cap is None:
        assert result.capped_logits is None
        torch.testing.assert_close(trace.last_logits, plain, rtol=0, atol=1e-5)
    else:
        assert float(result.capped_logits[0, 0]) == pytest.approx(float(plain[target]), abs=1e-4)
        assert float(result.logits[0, 0]) != pytest.approx(float(plain[target]), abs=1e-2)


def _preactivation_errors(engine: DePassEngine, ids: list[int]) -> list[float]:
    """Per MLP chunk, max |sum of the components' pre-activations - the true ones|,
    relative to the largest true one, for a token run from layer 0."""
    trace = engine.trace(ids)
    errors: list[float] = []
    layers: set[int] = set()

    def check(layer: int, summed: torch.Tensor, true: torch.Tensor) -> None:
        scale = max(float(true.abs().max()), 1e-6)
        errors.append(float((summed - true).abs().max()) / scale)
        layers.add(layer)

    start = token_start(trace.resid(0), 0, engine.token_texts(ids), None)
    member = Member(start=start, length=len(ids), positions=torch.arange(len(ids)))
    propagator = Propagator(
        engine.model, engine.family, [trace], torch.float32, 1 << 30, on_mlp=check
    )
    propagator.run([member], SplitSettings(), engine.info.num_layers)
    assert layers == set(range(engine.info.num_layers))
    return errors


def test_mlp_preactivations_add_up(family_engine: DePassEngine) -> None:
    errors = _preactivation_errors(family_engine, family_engine.tokenize(PROMPT))
    assert max(errors) <= 1e-5


def test_decomposition_is_causal(family_engine: DePassEngine) -> None:
    """A position's components do not depend on later tokens: the first ``n`` positions
    of the full prompt equal the prompt cut to ``n`` tokens."""
    ids = family_engine.tokenize(PROMPT)
    n = 6
    fields = {"outputs": ["states", "scores"], "targets": [5, 7]}
    full = family_engine.attribute(AttributionRequest(input_ids=ids, **fields))
    cut = family_engine.attribute(AttributionRequest(input_ids=ids[:n], **fields))
    want, got = full.states[:n, :n], cut.states
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    torch.testing.assert_close(cut.scores, full.scores[:n, :n], rtol=0, atol=1e-5)
    assert torch.count_nonzero(full.states[:n, n:]) == 0


def _no_offset(part):
    return replace(part, offset=0.0) if isinstance(part, RMSNorm) else part


def _wrong(family: Family) -> dict[str, Family]:
    """Declarations of ``family`` with one part wrong, by the mistake each shows."""
    wrong: dict[str, Family] = {}
    if family.attn_post_norm is not None:
        wrong["no attention post-norm"] = replace(family, attn_post_norm=None)
    if family.mlp_post_norm is not None:
        wrong["no MLP post-norm"] = replace(family, mlp_post_norm=None)
    if any(isinstance(p, RMSNorm) and p.offset for _, p in family.norms()):
        wrong["no (1 + w) offset"] = replace(
            family,
            **{role: _no_offset(part) for role, part in family.norms()},
            final_norm=_no_offset(family.final_norm),
        )
    if family.mlp_norm is not None and family.mlp_norm.path == "pre_feedforward_layernorm":
        # Llama's layout on Gemma: u^l read from the attention output's post-norm
        wrong["Llama layout"] = replace(
            family,
            attn_post_norm=None,
            mlp_norm=replace(family.mlp_norm, path="post_attention_layernorm"),
        )
    if isinstance(family.attn_norm, LayerNorm):
        uncentred = {role: replace(part, centred=False) for role, part in family.norms()}
        wrong["no LayerNorm centring"] = replace(family, **uncentred)
    if isinstance(family.attention, FusedAttention) and family.attention.layout == "blocks":
        wrong["keys read as values"] = replace(
            family, attention=_KeysAsValues(**vars(family.attention))
        )
    if isinstance(family.attention, FusedAttention) and family.attention.layout == "per_head":
        wrong["q/k/v read as blocks"] = replace(
            family, attention=replace(family.attention, layout="blocks")
        )
    if family.parallel or family.parallel_attr:  # conservation holds; pre-activations do not
        wrong["run as sequential"] = replace(family, parallel=False, parallel_attr=None)
    if isinstance(family.mlp, GatedMLP) and family.mlp.fused:
        wrong["up half read as the gate"] = replace(family, mlp=_UpAsGate(**vars(family.mlp)))
    if isinstance(family.mlp, MixtureMLP):
        wrong["routing weights dropped"] = replace(family, mlp=_Unweighted(**vars(family.mlp)))
        wrong["experts' up rows read as gates"] = replace(
            family, mlp=_UpRowsAsGates(**vars(family.mlp))
        )
        if family.mlp.shared is not None:
            wrong["shared expert's sigmoid gate dropped"] = replace(
                family, mlp=replace(family.mlp, shared_gate=None)
            )
    return wrong


@dataclass(frozen=True)
class _Unweighted(MixtureMLP):
    """Each chosen expert's activations at full weight, not times its routing weight."""

    def frozen(self, layer: torch.nn.Module, kept: dict, batch: tuple[int, int]) -> FrozenMLP:
        x, routes, weights = kept["routed"][:3]
        unweighted = {**kept, "routed": (x, routes, torch.ones_like(weights))}
        return super().frozen(layer, unweighted, batch)


@dataclass(frozen=True)
class _UpRowsAsGates(MixtureMLP):
    """Components read through each expert's up rows: shares still add up to the
    activations, but not to what the expert's gate computes."""

    def blocks(self, layer: torch.nn.Module) -> list:
        experts = layer.get_submodule(self.experts).gate_up_proj.detach()
        size = experts.shape[1] // 2
        return [
            replace(block, split_input=ProjectionWeights(experts[block.expert, size:], None))
            if block.expert is not None
            else block
            for block in super().blocks(layer)
        ]


@dataclass(frozen=True)
class _KeysAsValues(FusedAttention):
    """A fused projection sliced one block too early (keys for values; same shape)."""

    def value(self, layer: torch.nn.Module, config: object) -> ProjectionWeights:
        right = super().value(layer, config)
        fused = layer.get_submodule(self.qkv).weight.detach()
        fused = fused.T if self.transposed else fused  # (out, in)
        rows = right.weight.shape[0]
        start = fused.shape[0] - 2 * rows
        return ProjectionWeights(fused[start : start + rows], None)


@dataclass(frozen=True)
class _UpAsGate(GatedMLP):
    """Components read through the up half of a fused gate/up projection: shares still
    add up (conservation holds), but not to what the gate computes."""

    def split_input(self, layer: torch.nn.Module) -> ProjectionWeights:
        weight = layer.get_submodule(self.gate).weight.detach()
        return ProjectionWeights(weight[weight.shape[0] // 2 :], None)


TEETH = [(name, mistake) for name in FAMILY_NAMES for mistake in _wrong(family_called(name))]


@pytest.mark.parametrize(("name", "mistake"), TEETH)
def test_a_wrong_part_breaks_the_checks(name: str, mistake: str) -> None:
    right = family_engine_for(name)
    engine = DePassEngine(right.model, right.tokenizer, family=_wrong(right.family)[mistake])
    ids = engine.tokenize(PROMPT)
    result = engine.attribute(AttributionRequest(input_ids=ids))
    preactivation = max(_preactivation_errors(engine, ids))
    assert result.relative_conservation_error > 1e-3 or preactivation > 1e-3


def test_gpt_neox_without_parallel_residual_is_sequential() -> None:
    from engine.testing import tiny_model, word_tokenizer

    model = tiny_model("gpt_neox", seed=7, use_parallel_residual=False)
    engine = DePassEngine(model, word_tokenizer())
    assert not engine.family.parallel
    ids = engine.tokenize(PROMPT)
    for fields in ({}, {"granularity": "head", "start_layer": 0}):
        result = engine.attribute(AttributionRequest(input_ids=ids, **fields))
        assert result.relative_conservation_error <= 1e-4
    assert max(_preactivation_errors(engine, ids)) <= 1e-5


def test_every_tiny_family_has_teeth_or_is_llama_shaped() -> None:
    with_teeth = {name for name, _ in TEETH}
    assert with_teeth == set(FAMILY_NAMES) - set(shaped_like("llama"))
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(shaped_like("llama"))


@pytest.mark.parametrize(
    "family",
    sorted({f.name: f for f in FAMILIES.values()}.values(), key=lambda f: f.name),
    ids=lambda f: f.name,
)
def test_every_registered_family_has_a_tiny_model_under_test(family: Family) -> None:
    """The guard: each registered family builds its declared tiny model, which the
    registry maps back to it, and the family tests' matrix (conftest's ``FAMILY_NAMES``)
    runs it. A family registered without a tiny model that builds fails here."""
    from engine.testing import tiny_model

    assert family.name in FAMILY_NAMES
    model = tiny_model(family.name, seed=0)
    assert family_for(model) is family
    assert type(model).__name__ in family.architectures
    assert model.config.num_hidden_layers >= 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_registry_is_open_and_refuses_silent_replacement() -> None:
    custom = replace(FAMILIES["LlamaForCausalLM"], name="custom", architectures=("MyLM",))
    try:
        register(custom)
        assert family_named(["MyLM"]) is custom
        with pytest.raises(ValueError, match="already"):
            register(custom)
    finally:
        FAMILIES.pop("MyLM", None)


@pytest.mark.parametrize(
    "name", [name for name in FAMILY_NAMES if isinstance(family_called(name).mlp, MixtureMLP)]
)
def test_mixture_neurons_are_their_experts_weighted_outputs(name: str) -> None:
    """Neuron components of a mixture layer: each expert's neurons add up to that
    expert's output times its routing weight where the router chose it, and are exactly
    zero where it did not (the routing is frozen, not re-decided per component)."""
    engine = family_engine_for(name)
    ids = engine.tokenize(PROMPT)
    result = engine.attribute(
        AttributionRequest(
            input_ids=ids, granularity="neuron", start_layer=0, end_layer=1, outputs=["states"]
        )
    )
    layer = engine.family.layer(engine.model, 0)
    moe = layer.mlp
    with torch.inference_mode():
        x = layer.post_attention_layernorm(engine.trace(ids).layers[0].resid_mid)
        _, weights, chosen = moe.gate(x)
    experts = moe.experts
    size = experts.down_proj.shape[2]
    labels = result.components
    routed_somewhere = 0
    for e in range(experts.down_proj.shape[0]):
        rows = [i for i, label in enumerate(labels) if label.startswith(f"L0.E{e}.")]
        assert len(rows) == size
        summed = result.states[:, rows].sum(1)  # (N, D)
        with torch.inference_mode():
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, -1)
            output = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        weight = torch.where(chosen == e, weights, torch.zeros_like(weights)).sum(-1)
        torch.testing.assert_close(summed, output * weight[:, None], rtol=1e-4, atol=1e-5)
        unrouted = ~(chosen == e).any(-1)
        assert torch.count_nonzero(result.states[unrouted][:, rows]) == 0
        routed_somewhere += int((~unrouted).sum())
    assert routed_somewhere == len(ids) * chosen.shape[1]
