"""Hand-set one-layer models whose right decomposition is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import AttributionRequest, DePassEngine

EPS = 1e-6
EMBED = np.array(
    [[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 0.0, 1.0]]
)


def one_layer(
    value: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray
) -> LlamaForCausalLM:
    """Hidden 4, one head of size 4, two neurons; q = k = 0 (uniform causal attention),
    o_proj = identity, every norm gain 1."""
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=4,
        intermediate_size=2,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        rms_norm_eps=EPS,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.tensor(EMBED))
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.tensor(value))
        layer.self_attn.o_proj.weight.copy_(torch.eye(4))
        layer.mlp.gate_proj.weight.copy_(torch.tensor(gate))
        layer.mlp.up_proj.weight.copy_(torch.tensor(up))
        layer.mlp.down_proj.weight.copy_(torch.tensor(down))
        model.lm_head.weight.copy_(torch.eye(4))
    return model


def inv_rms(x: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt((x**2).mean(-1, keepdims=True) + EPS)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def test_token_split_with_uniform_attention() -> None:
    """Gate weights 0 -> the MLP outputs 0; attention averages each earlier token's
    normalised embedding, so token k holds h[k] at k plus s[k] h[k] / (q + 1) at q >= k."""
    model = one_layer(np.eye(4), np.zeros((2, 4)), np.ones((2, 4)), np.ones((4, 2)))
    ids = [0, 1, 2, 3]
    h = EMBED[ids]
    s = inv_rms(h)
    n = len(ids)
    expected = np.zeros((n, n, 4))  # (position, component, hidden)
    for q in range(n):
        for k in range(q + 1):
            expected[q, k] = (q == k) * h[k] + s[k] * h[k] / (q + 1)
    final = expected.sum(1)
    expected *= inv_rms(final)[:, None, :]

    result = DePassEngine(model).attribute(AttributionRequest(input_ids=ids, outputs=["states"]))
    np.testing.assert_allclose(result.states.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(result.remainder.abs().max()) == 0.0


GATE = np.array([[1.0, -2.0, 0.5, 0.0], [1.0, 0.0, 1.0, -1.0]])
UP = np.array([[0.5, 0.5, 1.0, -1.0], [1.0, 0.0, -0.5, 2.0]])
DOWN = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [0.5, 0.5]])


def hand_split(rule: str, gates: np.ndarray) -> np.ndarray:
    """Coefficients (parts, neurons) of the method page's rules for all-eligible parts."""
    if rule == "softmax":
        w = np.exp(gates / 0.1)
        return w / w.sum(0)
    if rule == "max":
        return (gates == gates.max(0)).astype(float)
    if rule == "relu":
        w = np.maximum(gates, 0.0)
        return w / w.sum(0)
    if rule == "linear":
        w = gates - gates.min(0)
        return w / w.sum(0)
    raise AssertionError(rule)


def two_part_states(rule: str, ids: list[int], parts: np.ndarray) -> np.ndarray:
    """The closed-form output states (N, 2, D) of a subspace run of two parts of the
    residual (``parts`` (2, N, D)) through :func:`one_layer` with W_V = 0 (no attention
    output): at each position, neuron i's output a_i W_down[:, i] is shared by the rule
    applied to each part's own gate pre-activation W_gate (s * part), both parts eligible
    (both are non-zero vectors), whatever their gate values."""
    h = EMBED[ids]
    s = inv_rms(h)
    g_parts = np.einsum("mnd,id->mni", parts * s, GATE)  # (2, N, I)
    g_true = (h * s) @ GATE.T
    act = silu(g_true) * ((h * s) @ UP.T)  # (N, I)
    expected = parts.copy()
    for n in range(len(ids)):
        gates = g_parts[:, n].copy()
        if n == 0:  # the first component's gate is set to 1.0 at position 0 (method page)
            gates[0] = 1.0
        alpha = hand_split(rule, gates)
        expected[:, n] += np.einsum("mi,di->md", alpha * act[n], DOWN)
    final = expected.sum(0)
    return (expected * inv_rms(final)).transpose(1, 0, 2)  # (N, 2, D)


def subspace_states(model: LlamaForCausalLM, ids: list[int], parts: np.ndarray, rule: str):
    request = AttributionRequest(
        input_ids=ids, granularity="subspace", subspace=parts, mlp_split=rule, outputs=["states"]
    )
    return DePassEngine(model).attribute(request).states.numpy()


@pytest.mark.parametrize("rule", ["softmax", "max", "relu"])
def test_mlp_split_of_two_parts(rule: str) -> None:
    """No attention output (W_V = 0); the residual of a 2-token prompt split into two given
    parts, each neuron shared by the rule applied to each part's own gate."""
    model = one_layer(np.zeros((4, 4)), GATE, UP, DOWN)
    ids = [2, 3]
    part_a = np.array([[0.2, 0.3, 0.1, 0.4], [1.5, -0.5, 0.25, 0.5]])
    parts = np.stack([part_a, EMBED[ids] - part_a])  # (2, N, D), adds up to h
    if rule == "relu":  # every neuron needs a positive gate at position 1
        gates = np.einsum("md,id->mi", parts[:, 1], GATE)
        assert (gates > 0).any(0).all()
    expected = two_part_states(rule, ids, parts)
    got = subspace_states(model, ids, parts, rule)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["softmax", "max", "linear"])
def test_present_part_with_a_gate_of_exactly_zero_keeps_its_share(rule: str) -> None:
    """A part whose gate for neuron 0 cancels to exactly 0.0 (W_gate[0] = [1, -2, .5, 0]
    against [2s, s, 0, .7s]) is still present: it takes part in the split with gate 0.
    The other part's gate is negative there, so the zero gate wins the whole neuron under
    ``max`` and ``linear`` and nearly all of it under ``softmax``; a rule that took a zero
    gate for an absent part would give it nothing."""
    model = one_layer(np.zeros((4, 4)), GATE, UP, DOWN)
    ids = [2, 1]
    part_a = np.array([[0.2, 0.3, 0.1, 0.4], [2.0, 1.0, 0.0, 0.7]])
    parts = np.stack([part_a, EMBED[ids] - part_a])
    s = inv_rms(EMBED[ids])
    gate_a = torch.tensor(part_a[1] * s[1], dtype=torch.float32) @ torch.tensor(
        GATE[0], dtype=torch.float32
    )
    assert float(gate_a) == 0.0  # exactly, in float32 as the engine computes it
    assert float(np.dot(parts[1, 1] * s[1], GATE[0])) < 0
    expected = two_part_states(rule, ids, parts)
    got = subspace_states(model, ids, parts, rule)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["module", "head"])
def test_last_component_gates_below_the_floor_count_as_absent(granularity: str) -> None:
    """The reference floors the gates of the last component of its layout (here the
    attention output, or the only head) below 1e-5: a tiny attention output (W_V = 1e-7 I)
    then takes no MLP share anywhere, and leaves layer 0 as it entered the MLP (scaled by
    the final norm). Without the floor it would take exp(g / T - peak) / Z of each neuron,
    far more than its own size."""
    model = one_layer(1e-7 * np.eye(4), GATE, UP, DOWN)
    ids = [2, 3, 0]
    fields = {"module": "attn"} if granularity == "module" else {}
    result = DePassEngine(model).attribute(
        AttributionRequest(
            input_ids=ids, granularity=granularity, start_layer=0, outputs=["states"], **fields
        )
    )
    trace = DePassEngine(model).trace(ids)
    if granularity == "module":  # u - h, as the module start takes it (rounded in float32)
        attn = (trace.layers[0].resid_mid - trace.layers[0].resid_pre).double().numpy()
    else:  # the head's output: uniform attention over the normalised inputs, times 1e-7
        h = EMBED[ids]
        s = inv_rms(h)
        attn = np.stack([(s[: q + 1] * h[: q + 1]).mean(0) * 1e-7 for q in range(len(ids))])
    final = result.states.sum(1).numpy() + result.remainder.numpy()
    scale = inv_rms(trace.resid_final.double().numpy())
    np.testing.assert_allclose(final, trace.normed_final.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.states[:, -1].numpy(), attn * scale, rtol=1e-4, atol=0)
