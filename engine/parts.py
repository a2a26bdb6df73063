"""Typed parts of a decoder layer: what each one freezes and how components cross it.

A model family (:mod:`engine.families`) is a declaration of these parts, each naming the
module it stands for by a dotted path (from the model root, or from one decoder layer):

- **Norms** (:class:`RMSNorm`, optionally with Gemma's ``(1 + w)`` offset, and
  :class:`LayerNorm`, which centres each component by its own per-position mean and gives
  its bias to the remainder). A norm freezes the per-position inverse scale of its true
  input (:meth:`inverse_scale`, from a pre-hook on its module) and is then linear:
  :class:`FrozenNorm` carries components through it.
- **Attention** (:class:`Attention` with separate projections, :class:`FusedAttention`
  with one fused q/k/v projection, stored as rows or, Conv1D, transposed). Once its
  probabilities are frozen it is linear in its input; the part gives the value and
  output projections that :mod:`engine.propagate` needs.
- **MLPs** (:class:`GatedMLP`, fused or not, and :class:`PlainMLP`, ``act(W_in x + b)``).
  Both freeze the true pre-activations ``g`` of the split input projection and the
  neuron activations ``a``; a gated MLP's ``g`` is its gate, a plain MLP's the
  pre-activation itself (its bias on the remainder's), so every split rule applies to
  both unchanged.
- **Read-out** (:class:`Readout`): the unembedding, with an optional final soft-cap.

Each part lists the hooks it needs (:meth:`hooks`) as ``(path, kind, key)`` triples;
:mod:`engine.capture` installs them and knows no family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

#: What a hook keeps: the module's first input, or its output (``output``: the whole
#: output, ``output[1]``: the second element, ``output[:I]``: the first half along the
#: last axis, for a fused gate/up projection).
HookKind = Literal["input", "output", "output[1]", "first_half"]


@dataclass(frozen=True)
class Hook:
    """One hook a part needs: on ``path`` (relative to the layer), keep ``kind`` as ``key``."""

    path: str
    kind: HookKind
    key: str


# ---------------------------------------------------------------------------- norms


@dataclass
class FrozenNorm:
    """A norm with its per-position scale frozen: linear in its input.

    ``scale``: (R, N, D) inverse scale times gain (``None``: no norm, the identity);
    ``centred``: subtract each vector's own mean first (LayerNorm); ``bias``: (D,) added
    to the remainder's output only.
    """

    scale: torch.Tensor | None
    centred: bool = False
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """``x`` through the norm; ``scale`` is the view of :attr:`scale` matching ``x``'s
        positions (from :meth:`at`)."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return x if scale is None else x * scale

    def at(self, *index: object) -> torch.Tensor | None:
        """The scale at ``index`` (``None`` for the identity)."""
        return None if self.scale is None else self.scale[index]

    @property
    def identity(self) -> bool:
        return self.scale is None and not self.centred and self.bias is None


IDENTITY = FrozenNorm(scale=None)


class NormPart(Protocol):
    """A normalisation module: frozen by its per-position inverse scale."""

    path: str
    centred: bool

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(..., N, 1) float32 inverse scale of ``x`` (..., N, D), as ``module`` computes it."""
        ...

    def gain(self, module: nn.Module) -> torch.Tensor:
        """(D,) the multiplier applied after scaling."""
        ...

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        """(D,) added after the gain (LayerNorm), or ``None``."""
        ...


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise AttributeError(f"{type(module).__name__} has no epsilon attribute")


@dataclass(frozen=True)
class RMSNorm:
    """``x / rms(x) * (w + offset)``; Gemma's RMSNorm has ``offset = 1``."""

    path: str
    offset: float = 0.0
    centred: bool = False

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _eps(module))

    def gain(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach() + self.offset

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None


@dataclass(frozen=True)
class LayerNorm:
    """``(x - mean(x)) / std(x) * w + b``: centring is linear (each component by its own
    mean), the bias goes to the remainder."""

    path: str
    centred: bool = True

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        variance = x32.var(-1, unbiased=False, keepdim=True)
        return torch.rsqrt(variance + _eps(module))

    def gain(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        bias = getattr(module, "bias", None)
        return None if bias is None else bias.detach()


def apply_norm(
    part: NormPart, module: nn.Module, x: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """``x`` (..., D) normalised with the frozen ``inverse`` scale (..., 1), no bias: what
    a component (not the remainder) becomes through the norm."""
    if part.centred:
        x = x - x.mean(-1, keepdim=True)
    return x * (inverse.to(x.dtype) * part.gain(module).to(x.device, x.dtype))


# ---------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class ProjectionWeights:
    """A projection as ``x @ weight.T + bias`` (``weight`` (out, in))."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _linear(module: nn.Module, transposed: bool, rows: slice | None = None) -> ProjectionWeights:
    """The weight (out, in) and bias of a Linear (or a transposed Conv1D) module."""
    weight = module.weight.detach()
    weight = weight.T if transposed else weight
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return ProjectionWeights(weight, bias)


@dataclass(frozen=True)
class Attention:
    """Self-attention with separate projections; ``module`` returns ``(output, probs)``."""

    module: str = "self_attn"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"

    def hooks(self) -> list[Hook]:
        return [Hook(self.module, "output[1]", "probs")]

    def value(self, layer: nn.Module, config: object) -> ProjectionWeights:
        """(H_kv d_h, D) value projection."""
        return _linear(layer.get_submodule(self.v_proj), transposed=False)

    def output(self, layer: nn.Module, config: object) -> ProjectionWeights:
        """(D, H d_h) output projection."""
        return _linear(layer.get_submodule(self.o_proj), transposed=False)


@dataclass(frozen=True)
class FusedAttention(Attention):
    """One projection computing queries, keys and values (Phi-3 ``qkv_proj``: the rows
    are ``[q | k | v]``; GPT-2 ``c_attn``: the same, stored transposed as a Conv1D;
    GPT-NeoX ``query_key_value``: ``[q_h | k_h | v_h]`` for each head ``h``)."""

    qkv: str = "self_attn.qkv_proj"
    layout: Literal["blocks", "per_head"] = "blocks"
    transposed: bool = False

    def value(self, layer: nn.Module, config: object) -> ProjectionWeights:
        heads, kv, dh = _head_counts(config)
        fused = _linear(layer.get_submodule(self.qkv), self.transposed)
        if self.layout == "blocks":
            rows = slice((heads + kv) * dh, (heads + 2 * kv) * dh)
            bias = None if fused.bias is None else fused.bias[rows]
            return ProjectionWeights(fused.weight[rows], bias)
        weight = fused.weight.view(heads, 3, dh, -1)[:, 2].reshape(heads * dh, -1)
        bias = None if fused.bias is None else fused.bias.view(heads, 3, dh)[:, 2].reshape(-1)
        return ProjectionWeights(weight, bias)

    def output(self, layer: nn.Module, config: object) -> ProjectionWeights:
        return _linear(layer.get_submodule(self.o_proj), self.transposed)


def _head_counts(config: object) -> tuple[int, int, int]:
    """Query heads, key/value heads and head size from a config."""
    heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    dh = int(getattr(config, "head_dim", None) or config.hidden_size // heads)  # type: ignore[attr-defined]
    return heads, kv, dh


# ---------------------------------------------------------------------------- MLPs


@dataclass(frozen=True)
class GatedMLP:
    """``down(act(gate(x)) * up(x))``; the split reads the gate. ``fused``: ``gate`` is a
    fused gate/up projection whose first half is the gate (Phi-3 ``gate_up_proj``)."""

    gate: str = "mlp.gate_proj"
    down: str = "mlp.down_proj"
    module: str = "mlp"
    fused: bool = False
    transposed: bool = False

    def hooks(self) -> list[Hook]:
        gate_kind: HookKind = "first_half" if self.fused else "output"
        return [Hook(self.gate, gate_kind, "gate"), Hook(self.down, "input", "act")]

    def split_input(self, layer: nn.Module) -> ProjectionWeights:
        """(I, D) the projection whose per-component outputs decide the split, and its
        bias (given to the remainder)."""
        projection = _linear(layer.get_submodule(self.gate), self.transposed)
        if not self.fused:
            return projection
        width = projection.weight.shape[0] // 2
        bias = None if projection.bias is None else projection.bias[:width]
        return ProjectionWeights(projection.weight[:width], bias)

    def output(self, layer: nn.Module) -> ProjectionWeights:
        """(D, I) the output projection."""
        return _linear(layer.get_submodule(self.down), self.transposed)


@dataclass(frozen=True)
class PlainMLP(GatedMLP):
    """``out(act(in(x) + b))`` (GPT-2, GPT-NeoX): each neuron is split by the components'
    pre-activations ``W_in c_m`` (the bias on the remainder's), which add up to the true
    pre-activation."""

    gate: str = "mlp.c_fc"
    down: str = "mlp.c_proj"


# ---------------------------------------------------------------------------- read-out


@dataclass(frozen=True)
class Readout:
    """The unembedding (``path``), and the config attribute of a final soft-cap
    ``c tanh(logit / c)`` (Gemma 2): scores then add up to the logit before the cap."""

    path: str = "lm_head"
    softcap_attr: str | None = None

    def softcap(self, config: object) -> float | None:
        if self.softcap_attr is None:
            return None
        value = getattr(config, self.softcap_attr, None)
        return None if value is None else float(value)


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """What the model outputs for pre-cap ``logits``."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)
