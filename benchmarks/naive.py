"""Naive token-level DePass: a plain, slow, obviously-correct baseline.

Written from ``shared/docs/depass-method.md`` alone, independently of ``engine/``, as the
reference that benchmarks time the engine against and that tests cross-check it with.

The maths, for a Llama-style pre-norm decoder (``u = h + Attn(Norm_in(h))``,
``h' = u + MLP(Norm_post(u))``, output ``Norm_final(h^L)``):

* One ordinary forward pass fixes the nonlinear parts: the RMSNorm scales
  ``s[n] = w * rsqrt(mean(x[n]^2) + eps)`` of the true states, the attention probabilities
  ``A_h[q, k]``, the MLP gate pre-activations ``g[n, i]`` and activations
  ``a[n, i] = act(g) * up``.
* The residual entering ``start_layer`` is split into ``M = N + 1`` components: component k
  holds ``h[k]`` at position k (zero elsewhere); the last one is the bias/remainder component
  (zero at the start).  All maps below are linear in the components, so they always add up
  to the true residual (conservation).
* Attention: component m gets ``sum_h W_O^h sum_k A_h[q, k] W_V^{g(h)} (s * c_m)[k]``; the value
  bias (mixed by probabilities that sum to 1, i.e. ``o_proj(repeat_kv(b_v))``) and any
  ``o_proj`` bias go to the remainder.
* MLP: neuron i's output ``a[n, i] W_down[:, i]`` is shared by coefficients ``alpha_m[n, i]``
  (summing to 1 over m) computed from each component's own gate
  ``g_m = W_gate (s * c_m)``; rules ``softmax`` (temperature T), ``relu``, ``max``,
  ``linear`` over the eligible components, or ``taylor`` (share ``g_m / g``).
* At the end every component is multiplied by the frozen final-norm scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MLP_SPLITS = ("softmax", "relu", "max", "linear", "taylor")

#: the remainder component's gate counts as zero (ineligible) below this magnitude
REMAINDER_GATE_EPS = 1e-5


@dataclass
class FrozenLayer:
    """What DePass freezes from the true forward pass for one decoder layer (batch squeezed)."""

    resid_in: torch.Tensor | None = None  # (N, D) residual entering the layer
    resid_mid: torch.Tensor | None = None  # (N, D) residual after attention
    attn_probs: torch.Tensor | None = None  # (H, N, N) attention probabilities
    gate: torch.Tensor | None = None  # (N, I) gate_proj output g
    act: torch.Tensor | None = None  # (N, I) down_proj input a = act(g) * up


@dataclass
class FrozenForward:
    """All frozen quantities of one forward pass."""

    layers: list[FrozenLayer] = field(default_factory=list)
    pre_norm: torch.Tensor | None = None  # (N, D) input of the final norm


def capture_forward(model: nn.Module, input_ids: list[int]) -> FrozenForward:
    """Run one ordinary forward pass and record, with hooks, what DePass holds fixed."""
    decoder = model.model
    frozen = FrozenForward(layers=[FrozenLayer() for _ in decoder.layers])
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def first_input_to(record: FrozenLayer | FrozenForward, name: str):
        """A pre-hook storing a module's first positional input under ``name``."""

        def hook(_module: nn.Module, args: tuple) -> None:
            setattr(record, name, args[0][0].detach().float().clone())

        return hook

    def output_to(record: FrozenLayer, name: str, index: int | None = None):
        """A forward hook storing a module's output (or element ``index`` of it)."""

        def hook(_module: nn.Module, _args: tuple, output) -> None:
            value = output if index is None else output[index]
            if value is None:
                raise RuntimeError("attention weights missing: load the model with eager attention")
            setattr(record, name, value[0].detach().float().clone())

        return hook

    try:
        for layer, rec in zip(decoder.layers, frozen.layers, strict=True):
            handles += [
                layer.input_layernorm.register_forward_pre_hook(first_input_to(rec, "resid_in")),
                layer.post_attention_layernorm.register_forward_pre_hook(
                    first_input_to(rec, "resid_mid")
                ),
                layer.self_attn.register_forward_hook(output_to(rec, "attn_probs", index=1)),
                layer.mlp.gate_proj.register_forward_hook(output_to(rec, "gate")),
                layer.mlp.down_proj.register_forward_pre_hook(first_input_to(rec, "act")),
            ]
        handles.append(decoder.norm.register_forward_pre_hook(first_input_to(frozen, "pre_norm")))
        with torch.no_grad():
            model(torch.tensor([input_ids], dtype=torch.long), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return frozen


def rms_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Frozen RMSNorm scale per position, ``w * rsqrt(mean(x^2) + eps)``, shape (N, D)."""
    rsqrt = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return rsqrt * norm.weight.float()


def attention_step(layer: nn.Module, comps: torch.Tensor, frozen: FrozenLayer) -> torch.Tensor:
    """Decomposed attention output (M, N, D) for components ``comps`` (M, N, D)."""
    attn = layer.self_attn
    w_v = attn.v_proj.weight.float()  # (H_kv * d_h, D)
    w_o = attn.o_proj.weight.float()  # (D, H * d_h)
    probs = frozen.attn_probs  # (H, N, N)
    n_heads = probs.shape[0]
    d_h = w_o.shape[1] // n_heads
    n_kv = w_v.shape[0] // d_h
    group = n_heads // n_kv

    c_hat = comps * rms_scale(layer.input_layernorm, frozen.resid_in)
    values = c_hat @ w_v.T  # (M, N, H_kv * d_h), no bias
    out = torch.zeros_like(comps)
    for h in range(n_heads):
        kv = h // group
        v_h = values[..., kv * d_h : (kv + 1) * d_h]  # (M, N, d_h)
        mixed = probs[h] @ v_h  # (M, N, d_h): sum_k A_h[q, k] v[k]
        out += mixed @ w_o[:, h * d_h : (h + 1) * d_h].T

    # Biases belong to no input: the value bias (probabilities sum to 1) and the o_proj bias.
    bias = torch.zeros(w_o.shape[0])
    if attn.v_proj.bias is not None:
        b_v = attn.v_proj.bias.float().view(n_kv, d_h)
        bias += w_o @ b_v.repeat_interleave(group, dim=0).reshape(-1)
    if attn.o_proj.bias is not None:
        bias += attn.o_proj.bias.float()
    out[-1] += bias
    return out


def mlp_coefficients(
    gates: torch.Tensor,
    true_gate: torch.Tensor,
    present: torch.Tensor,
    mlp_split: str,
    temperature: float,
    first_token_rule: bool,
) -> torch.Tensor:
    """Coefficients (M, N, I) splitting each (position, neuron) among the components.

    ``gates`` (M, N, I) are the components' own gate pre-activations, last = remainder;
    ``true_gate`` (N, I) is the gate of the true forward pass; ``present`` (M, N) says
    where each component's vector is non-zero (eligibility comes from it, never from a
    gate that happens to be 0.0).  The coefficients sum to 1 over components wherever the
    neuron's share is defined (taylor: where ``true_gate != 0``).
    """
    if mlp_split == "taylor":
        # share g_m / g: sums to 1 over m because sum_m g_m = g; no eligibility rules.
        safe = torch.where(true_gate == 0, torch.ones_like(true_gate), true_gate)
        return torch.where(true_gate == 0, torch.zeros_like(gates), gates / safe)

    g = gates.clone()
    eligible = present[:, :, None].expand_as(g).clone()
    g[0, 0, :] = 1.0  # position-0 rule: component 0 takes its own first position
    eligible[0, 0, :] = True
    eligible[-1] &= g[-1].abs() >= REMAINDER_GATE_EPS
    if first_token_rule:
        eligible[0, 1:, :] = False  # first-token rule: no MLP share after position 0

    if mlp_split == "softmax":
        logits = torch.where(eligible, g / temperature, torch.full_like(g, -torch.inf))
        alpha = torch.softmax(logits, dim=0)
    elif mlp_split == "relu":
        pos = torch.where(eligible, g.clamp(min=0), torch.zeros_like(g))
        total = pos.sum(0, keepdim=True)
        alpha = pos / torch.where(total > 0, total, torch.ones_like(total))
        eligible = eligible & (total > 0)  # no positive eligible gate: remainder takes it
    elif mlp_split == "max":
        masked = torch.where(eligible, g, torch.full_like(g, -torch.inf))
        winner = masked.argmax(0, keepdim=True)
        alpha = torch.zeros_like(g).scatter_(0, winner, 1.0)
    elif mlp_split == "linear":
        low = torch.where(eligible, g, torch.full_like(g, torch.inf)).amin(0, keepdim=True)
        shifted = torch.where(eligible, (g - low).clamp(min=0), torch.zeros_like(g))
        total = shifted.sum(0, keepdim=True)
        equal = eligible.float() / eligible.sum(0, keepdim=True).clamp(min=1)
        alpha = torch.where(total > 0, shifted / torch.where(total > 0, total, 1.0), equal)
    else:
        raise ValueError(f"unknown mlp_split {mlp_split!r}; expected one of {MLP_SPLITS}")

    # No eligible component at (n, i): the remainder takes the whole neuron.
    none = ~eligible.any(0)  # (N, I)
    alpha = torch.where(none.unsqueeze(0), torch.zeros_like(alpha), alpha)
    alpha[-1] = torch.where(none, torch.ones_like(alpha[-1]), alpha[-1])
    return alpha


def mlp_step(
    layer: nn.Module,
    comps: torch.Tensor,
    frozen: FrozenLayer,
    mlp_split: str,
    temperature: float,
    first_token_rule: bool,
) -> torch.Tensor:
    """Decomposed MLP output (M, N, D) for components ``comps`` (M, N, D)."""
    mlp = layer.mlp
    c_hat = comps * rms_scale(layer.post_attention_layernorm, frozen.resid_mid)
    gates = c_hat @ mlp.gate_proj.weight.float().T  # (M, N, I)
    if mlp.gate_proj.bias is not None:
        gates[-1] += mlp.gate_proj.bias.float()  # a gate bias belongs to the remainder
    present = comps.ne(0).any(-1)  # (M, N)
    alpha = mlp_coefficients(gates, frozen.gate, present, mlp_split, temperature, first_token_rule)
    out = (alpha * frozen.act) @ mlp.down_proj.weight.float().T
    if mlp.down_proj.bias is not None:
        out[-1] += mlp.down_proj.bias.float()
    return out


def naive_token_decomposition(
    model,
    input_ids: list[int],
    start_layer: int = 0,
    mlp_split: str = "softmax",
    temperature: float = 0.1,
    first_token_rule: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (states, remainder): states (N, N, D) = (position, component, hidden), the token
    components of the final-norm-scaled output (component k = input token k, from the residual
    entering start_layer), and remainder (N, D), the bias/remainder component, also scaled."""
    if mlp_split not in MLP_SPLITS:
        raise ValueError(f"unknown mlp_split {mlp_split!r}; expected one of {MLP_SPLITS}")
    layers = model.model.layers
    if not 0 <= start_layer < len(layers):
        raise ValueError(f"start_layer {start_layer} outside 0..{len(layers) - 1}")
    frozen = capture_forward(model, input_ids)

    with torch.no_grad():
        h_start = frozen.layers[start_layer].resid_in  # (N, D)
        n, d = h_start.shape
        comps = torch.zeros(n + 1, n, d)  # (component, position, hidden); last = remainder
        tokens = torch.arange(n)
        comps[tokens, tokens] = h_start

        for index in range(start_layer, len(layers)):
            layer, rec = layers[index], frozen.layers[index]
            comps = comps + attention_step(layer, comps, rec)
            comps = comps + mlp_step(layer, comps, rec, mlp_split, temperature, first_token_rule)

        comps = comps * rms_scale(model.model.norm, frozen.pre_norm)
    return comps[:-1].transpose(0, 1).contiguous(), comps[-1].clone()
