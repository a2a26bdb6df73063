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
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", ["softmax", "max", "relu"])
def test_mlp_split_of_two_parts(rule: str) -> None:
    """No attention output (W_V = 0); the residual of a 2-token prompt split into two given
    parts; at position 1 neuron i's output a_i W_down[:, i] is shared by the rule applied
    to each part's own gate pre-activation W_gate (s * part)."""
    model = one_layer(np.zeros((4, 4)), GATE, UP, DOWN)
    ids = [2, 3]
    h = EMBED[ids]
    part_a = np.array([[0.2, 0.3, 0.1, 0.4], [1.5, -0.5, 0.25, 0.5]])
    parts = np.stack([part_a, h - part_a])  # (2, N, D), adds up to h
    s = inv_rms(h)
    g_parts = np.einsum("mnd,id->mni", parts * s, GATE)  # (2, N, I)
    g_true = (h * s) @ GATE.T
    act = silu(g_true) * ((h * s) @ UP.T)  # (N, I)
    assert (g_parts[:, 1] > 0).any(0).all(), "relu needs a positive gate per neuron"

    expected = parts.copy()
    alpha = hand_split(rule, g_parts[:, 1])  # position 1 only
    expected[:, 1] += np.einsum("mi,di->md", alpha * act[1], DOWN)
    # Position 0: the first component's gate is set to 1.0 before the split (method page).
    g0 = g_parts[:, 0].copy()
    g0[0] = 1.0
    if rule == "relu":
        g0 = np.where(g0 > 0, g0, 0.0)
    alpha0 = hand_split(rule, g0) if rule != "relu" else g0 / g0.sum(0)
    expected[:, 0] += np.einsum("mi,di->md", alpha0 * act[0], DOWN)
    final = expected.sum(0)
    expected = (expected * inv_rms(final)).transpose(1, 0, 2)  # (N, 2, D)

    result = DePassEngine(model).attribute(
        AttributionRequest(
            input_ids=ids,
            granularity="subspace",
            subspace=parts,
            mlp_split=rule,
            outputs=["states"],
        )
    )
    np.testing.assert_allclose(result.states.numpy(), expected, rtol=1e-5, atol=1e-6)
