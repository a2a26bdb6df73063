"""Typed parts of a decoder layer: what each one freezes and how components cross it.

A model family (:mod:`engine.families`) is a declaration of these parts, each naming the
module it stands for by a dotted path (from the model root, or from one decoder layer):

- **Norms** (:class:`RMSNorm`, optionally with Gemma's ``(1 + w)`` offset, and
  :class:`LayerNorm`, which centres each component by its own per-position mean and gives
  its bias to the remainder). A norm freezes the per-position inverse scale of its true
  input (:meth:`inverse_scale`, from a pre-hook on its module) and is then linear:
  :meth:`freeze` gives the :class:`FrozenNorm` that carries components through it.
- **Attention** (:class:`Attention` with separate projections, :class:`FusedAttention`
  with one fused q/k/v projection, stored as rows or, Conv1D, transposed). Once its
  probabilities are frozen it is linear in its input: :meth:`Attention.freeze` gives its
  frozen operator (:class:`FrozenAttention`, the :class:`AttentionOperator` protocol):
  values, mixing with the frozen probabilities, output projection, per-head outputs and
  the bias that goes to the remainder.
- **MLPs** (:class:`GatedMLP`, fused or not, :class:`PlainMLP`, ``out(act(in(x) + b))``,
  and :class:`MixtureMLP`, a mixture of experts with its routing frozen). All freeze the
  true pre-activations ``g`` of the split input projection and the neuron activations
  ``a``; a gated MLP's ``g`` is its gate, a plain MLP's the pre-activation itself (its
  bias on the remainder's), so every split rule applies to all unchanged. An MLP is one
  or more :class:`NeuronBlock` runs of one neuron axis: a dense MLP one, a mixture one
  per expert (each expert's activations times its frozen routing weight) and its shared
  expert; :meth:`freeze` gives them cast for propagation (:class:`FrozenNeurons`: each
  run's split input and output projections, the remainder's pre-activation bias and
  where its expert was chosen).
- **Read-out** (:class:`Readout`): the unembedding, with an optional final soft-cap.

Parts own their maths: :mod:`engine.propagate` runs the frozen objects these parts give
and reads no weight itself. A new layout is a new part type implementing the same
protocol (:class:`AttentionPart` with its :class:`AttentionOperator`, or a
:class:`NeuronAxisMLP` whose :meth:`~NeuronAxisMLP.blocks` lay out its neuron axis); the
propagation loop stays untouched.

Each part lists the hooks it needs (:meth:`hooks`) as ``(path, kind, key)`` triples;
:mod:`engine.capture` installs them and knows no family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn

#: What a hook keeps: the module's first input (``input``), all its positional inputs
#: (``arguments``, a tuple), or its output (``output``: the whole output, ``output[1]``:
#: the second element, ``first_half``: the first half along the last axis, for a fused
#: gate/up projection).
HookKind = Literal["input", "arguments", "output", "output[1]", "first_half"]


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
    ``centred``: subtract each vector's own mean first (LayerNorm); ``shift``: (D,) the
    norm's bias, added to the remainder's output only.
    """

    scale: torch.Tensor | None
    centred: bool = False
    shift: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """``x`` through the norm; ``scale`` is the view of :attr:`scale` matching ``x``'s
        positions (from :meth:`at`)."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return x if scale is None else x * scale

    def at(self, *index: int | slice | torch.Tensor) -> torch.Tensor | None:
        """The scale at ``index`` (``None`` for the identity)."""
        return None if self.scale is None else self.scale[index]

    @property
    def identity(self) -> bool:
        return self.scale is None and not self.centred and self.shift is None


IDENTITY = FrozenNorm(scale=None)


class NormPart(Protocol):
    """A normalisation module: frozen by its per-position inverse scale."""

    @property
    def path(self) -> str:
        """The norm module (inside one layer, or from the root for the final norm)."""
        ...

    @property
    def centred(self) -> bool:
        """Whether it subtracts each vector's own mean first (LayerNorm)."""
        ...

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(..., N, 1) float32 inverse scale of ``x`` (..., N, D), as ``module`` computes it."""
        ...

    def gain(self, module: nn.Module) -> torch.Tensor:
        """(D,) the multiplier applied after scaling."""
        ...

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        """(D,) added after the gain (LayerNorm), or ``None``."""
        ...

    def freeze(
        self, module: nn.Module, inverse: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> FrozenNorm:
        """The norm with its (R, N, 1) ``inverse`` scale frozen, on ``device`` in ``dtype``."""
        ...


class _Norm:
    """What every norm part shares: freezing from its gain and bias."""

    centred: bool

    def gain(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    def freeze(
        self, module: nn.Module, inverse: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> FrozenNorm:
        """The norm with its (R, N, 1) ``inverse`` scale frozen: (R, N, D) scale times
        gain, and its bias (the remainder's), on ``device`` in ``dtype``."""
        bias = self.bias(module)
        return FrozenNorm(
            scale=inverse * _cast(self.gain(module), device, dtype),
            centred=self.centred,
            shift=None if bias is None else _cast(bias, device, dtype),
        )


def _cast(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` detached, on ``device`` in ``dtype`` (itself when it already is)."""
    return tensor.detach().to(device, dtype)


def module_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module``'s parameter (or buffer) ``name``: ``nn.Module.__getattr__`` is typed
    ``Tensor | Module``."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return value


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module.act_fn``, the activation of a Hugging Face MLP or experts module."""
    return cast(Callable[[torch.Tensor], torch.Tensor], module.act_fn)


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise AttributeError(f"{type(module).__name__} has no epsilon attribute")


@dataclass(frozen=True)
class RMSNorm(_Norm):
    """``x / rms(x) * (w + offset)``; Gemma's RMSNorm has ``offset = 1``."""

    path: str
    offset: float = 0.0
    centred: bool = False

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _eps(module))

    def gain(self, module: nn.Module) -> torch.Tensor:
        return module_tensor(module).detach() + self.offset

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None


@dataclass(frozen=True)
class LayerNorm(_Norm):
    """``(x - mean(x)) / std(x) * w + b``: centring is linear (each component by its own
    mean), the bias goes to the remainder."""

    path: str
    centred: bool = True

    def inverse_scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        variance = x32.var(-1, unbiased=False, keepdim=True)
        return torch.rsqrt(variance + _eps(module))

    def gain(self, module: nn.Module) -> torch.Tensor:
        return module_tensor(module).detach()

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

#: The MLP split (gates, coefficients, shares) always runs in float32: a softmax over
#: components at temperature 0.1 in bfloat16 would round shares to 3 significant digits.
SPLIT_DTYPE = torch.float32


def project(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ weight.T`` computed in ``weight``'s dtype, returned in ``out_dtype``."""
    return (x.to(weight.dtype) @ weight.T).to(out_dtype)


def stack_padded(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """(R, length, ...) from R tensors of shape (n_r, ...), zero-padded at the end."""
    if len(tensors) == 1 and tensors[0].shape[0] == length:
        return tensors[0][None]
    out = tensors[0].new_zeros(len(tensors), length, *tensors[0].shape[1:])
    for r, tensor in enumerate(tensors):
        out[r, : tensor.shape[0]] = tensor
    return out


def optional_sum(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not ``None`` (``None`` if all are)."""
    present = [t for t in terms if t is not None]
    return None if not present else sum(present[1:], present[0])


@dataclass(frozen=True)
class ProjectionWeights:
    """A projection as ``x @ weight.T + bias`` (``weight`` (out, in))."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _linear(module: nn.Module, transposed: bool, rows: slice | None = None) -> ProjectionWeights:
    """The weight (out, in) and bias of a Linear (or a transposed Conv1D) module."""
    weight = module_tensor(module).detach()
    weight = weight.T if transposed else weight
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return ProjectionWeights(weight, bias)


@dataclass(frozen=True)
class AttentionShape:
    """Query heads ``H``, key/value heads ``H_kv`` and head width ``d_h`` of a layer."""

    heads: int
    kv_heads: int
    head_dim: int


class AttentionOperator(Protocol):
    """Attention with its probabilities frozen: a linear map of its (normalised) input.

    What :mod:`engine.propagate` runs; it reads no weight. Contexts are per-head mixed
    values ``(.., H * d_h)`` as the output projection reads them, in the matmul dtype.
    """

    #: (R, H, N, N) the frozen probabilities, zero-padded to the batch's longest prompt.
    probs: torch.Tensor
    shape: AttentionShape
    #: (D,) what the value and output biases (and the pre-norm's bias, through the values:
    #: probabilities sum to one) add at every position: the remainder's, before a post-norm.
    constant: torch.Tensor

    @property
    def value_width(self) -> int:
        """Width of the values (``H_kv d_h``): what a key position costs to project."""
        ...

    @property
    def context_width(self) -> int:
        """Width of the contexts (``H d_h``): what the output projection reads."""
        ...

    def head_context(
        self, x: torch.Tensor, start: int = 0, probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, R, Q, H d_h) contexts of ``x`` (B, R, N', D), the normalised components at
        positions ``start..``, mixed by ``probs`` (R, H, Q, N') (default: every query from
        ``start`` on): project every key position, then mix."""
        ...

    def query_context(self, x: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`head_context` for a few queries: mix the inputs over the keys, then
        project the H Q mixtures."""
        ...

    def output(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(.., D) the output projection of ``context`` (.., H d_h), in ``dtype``."""
        ...

    def head_outputs(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(H, N, D) each head's share of the output of ``context`` (N, H d_h), in ``dtype``."""
        ...

    def head_vectors(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """(B, R, H, D) each head's output of one value, ``W_O,h W_V,h x``, for ``x``
        (B, R, D) the normalised components at positions ``at`` (B,): what the frozen
        probabilities spread over the queries when a component lives at one position."""
        ...


class AttentionPart(Protocol):
    """An attention module of a layer: its hooks, shape and frozen operator.

    A new attention layout (DeepSeek-V3's multi-head latent attention, whose value is
    ``kv_b_proj(norm(kv_a_proj(x)))``, say) is a new part type with its own
    :class:`AttentionOperator`; :mod:`engine.propagate` stays as it is.
    """

    @property
    def module(self) -> str:
        """The attention module (inside one layer), whose output is ``(output, probs)``."""
        ...

    @property
    def o_proj(self) -> str:
        """The output projection (inside one layer), whose input is the heads, concatenated."""
        ...

    def hooks(self) -> list[Hook]: ...

    def shape(self, layer: nn.Module, config: object) -> AttentionShape:
        """Heads, key/value heads and head width, read from the weights."""
        ...

    def freeze(
        self,
        layer: nn.Module,
        config: object,
        probs: torch.Tensor,
        input_bias: torch.Tensor | None,
        dtype: torch.dtype,
        matmul_dtype: torch.dtype,
    ) -> AttentionOperator:
        """The frozen operator of ``layer``'s attention for ``probs`` (R, H, N, N) in the
        matmul dtype; ``input_bias`` (D,): the pre-norm's bias, which every position's
        input carries (the remainder's); biases in ``dtype``, projections in
        ``matmul_dtype``, on ``probs``' device."""
        ...


@dataclass
class FrozenAttention:
    """Attention with separate (or already split) value and output projections and its
    probabilities frozen (:class:`AttentionOperator`).

    ``values`` (H_kv d_h, D) and ``out`` (D, H d_h) in the matmul dtype; query heads of a
    group ``G = H / H_kv`` share their key/value head. Mixing runs per key/value head in
    head space, one batched product over (R H_kv, G Q, B d_h), so that the probabilities
    are read once for every component of a block.
    """

    values: torch.Tensor
    out: torch.Tensor
    probs: torch.Tensor
    shape: AttentionShape
    constant: torch.Tensor

    @property
    def value_width(self) -> int:
        return int(self.values.shape[0])

    @property
    def context_width(self) -> int:
        return int(self.out.shape[1])

    def head_context(
        self, x: torch.Tensor, start: int = 0, probs: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, members, length, _ = x.shape
        kv, dh = self.shape.kv_heads, self.shape.head_dim
        group = self.shape.heads // kv
        values = (x.to(self.values.dtype) @ self.values.T).view(batch, members, length, kv, dh)
        values = values.permute(1, 3, 2, 0, 4).reshape(members * kv, length, batch * dh)
        if probs is None:
            probs = self.probs[:, :, start:, start:]
        queries = probs.shape[2]
        probs = probs.reshape(members * kv, group * queries, length)
        context = torch.bmm(probs, values)  # (R * H_kv, G * Q, B * d_h)
        context = context.view(members, kv, group, queries, batch, dh).permute(4, 0, 3, 1, 2, 5)
        return context.reshape(batch, members, queries, self.shape.heads * dh)

    def query_context(self, x: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        """Each head's probabilities first average the normalised inputs over the keys,
        and only those averages go through the value projection: ``H Q`` projections per
        component instead of one per key position (``start``: unused, the values do not
        depend on the position)."""
        batch, members, _, hidden = x.shape
        kv, dh, heads = self.shape.kv_heads, self.shape.head_dim, self.shape.heads
        queries = probs.shape[2]
        # (B, R, H, Q, D); an einsum, so that no (B, R, H, N', D) broadcast is materialised
        mixed = torch.einsum("rhqn,brnd->brhqd", probs, x.to(probs.dtype))
        w_v = self.values.view(kv, 1, dh, hidden).expand(-1, heads // kv, -1, -1)
        w_v = w_v.reshape(heads, dh, hidden)
        context = torch.einsum("brhqd,hkd->brqhk", mixed.to(w_v.dtype), w_v)
        return context.reshape(batch, members, queries, heads * dh)

    def output(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return project(context, self.out, dtype)

    def head_outputs(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        heads, dh = self.shape.heads, self.shape.head_dim
        context = context.view(context.shape[0], heads, dh).to(dtype)  # (N, H, d_h)
        w_o = self.out.to(dtype).view(-1, heads, dh)  # (D, H, d_h)
        return torch.einsum("nhd,ehd->hne", context, w_o)

    def head_vectors(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        rows, members, hidden = x.shape
        heads, dh = self.shape.heads, self.shape.head_dim
        group = heads // self.shape.kv_heads
        v = (x.to(self.values.dtype) @ self.values.T).view(rows, members, -1, 1, dh)
        v = v.expand(-1, -1, -1, group, -1).reshape(rows, members, heads, dh)
        return torch.einsum("brhd,ehd->brhe", v, self.out.view(hidden, heads, dh))


@dataclass(frozen=True)
class Attention:
    """Self-attention with separate projections; ``module`` returns ``(output, probs)``.

    Its frozen operator is :class:`FrozenAttention` over :meth:`value` and :meth:`output`;
    a part type whose projections are stored otherwise overrides those two.
    """

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

    def shape(self, layer: nn.Module, config: object) -> AttentionShape:
        heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
        head_dim = int(self.output(layer, config).weight.shape[1]) // heads  # H d_h / H
        kv_heads = int(self.value(layer, config).weight.shape[0]) // head_dim
        return AttentionShape(heads, kv_heads, head_dim)

    def freeze(
        self,
        layer: nn.Module,
        config: object,
        probs: torch.Tensor,
        input_bias: torch.Tensor | None,
        dtype: torch.dtype,
        matmul_dtype: torch.dtype,
    ) -> FrozenAttention:
        value, output = self.value(layer, config), self.output(layer, config)
        device = probs.device
        w_v = _cast(value.weight, device, matmul_dtype)  # (H_kv * d_h, D)
        w_o = _cast(output.weight, device, matmul_dtype)  # (D, H * d_h)
        heads = int(probs.shape[1])
        head_dim = w_o.shape[1] // heads
        shape = AttentionShape(heads, w_v.shape[0] // head_dim, head_dim)
        # Biases belong to no input: the attention output of the value bias and of the
        # pre-norm's bias (probabilities sum to one), and the output bias.
        value_bias = optional_sum(
            None if value.bias is None else _cast(value.bias, device, dtype),
            None if input_bias is None else _cast(value.weight, device, dtype) @ input_bias,
        )
        bias = torch.zeros(w_o.shape[0], device=device, dtype=dtype)
        if value_bias is not None:
            group = shape.heads // shape.kv_heads
            b_v = value_bias.view(shape.kv_heads, 1, shape.head_dim)
            bias += _cast(output.weight, device, dtype) @ b_v.expand(-1, group, -1).reshape(-1)
        if output.bias is not None:
            bias += _cast(output.bias, device, dtype)
        return FrozenAttention(values=w_v, out=w_o, probs=probs, shape=shape, constant=bias)


@dataclass(frozen=True)
class FusedAttention(Attention):
    """One projection computing queries, keys and values (Phi-3 ``qkv_proj``: the rows
    are ``[q | k | v]``; GPT-2 ``c_attn``: the same, stored transposed as a Conv1D;
    GPT-NeoX ``query_key_value``: ``[q_h | k_h | v_h]`` for each head ``h``).

    Its own maths is the split of the fused projection (:meth:`value`, and a transposed
    output projection); once split, its frozen operator is :class:`FrozenAttention`."""

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
class NeuronBlock:
    """A run of neurons of a layer's neuron axis that one input and one output projection
    serve: ``columns`` of the axis, ``split_input`` (I_b, D) and ``output`` (D, I_b).
    ``expert``: the routed expert these neurons belong to (``None``: they run at every
    position), so that propagation computes them only where that expert was chosen."""

    columns: slice
    split_input: ProjectionWeights
    output: ProjectionWeights
    expert: int | None = None


@dataclass
class FrozenNeuronBlock:
    """A :class:`NeuronBlock` cast for propagation: ``columns`` of the neuron axis, its
    split input (I_b, D) and output (D, I_b) projections in the matmul dtype,
    ``remainder_bias`` (I_b,) float32, the remainder's own pre-activation (the input
    bias, and the pre-norm's bias through the input projection), and ``routed`` (R, N):
    where its expert was chosen (``None``: everywhere)."""

    columns: slice
    split_input: torch.Tensor
    out: torch.Tensor
    remainder_bias: torch.Tensor | None
    routed: torch.Tensor | None

    @property
    def width(self) -> int:
        """Neurons of the run (``I_b``)."""
        return int(self.split_input.shape[0])

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(.., I_b) float32 what each component ``x`` (.., D) gives the split input."""
        return project(x, self.split_input, SPLIT_DTYPE)

    def output(self, shares: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(.., D) the output projection of neuron ``shares`` (.., I_b), in ``dtype``."""
        return project(shares, self.out, dtype)


@dataclass
class FrozenNeurons:
    """A layer's MLP with its activations frozen, as propagation runs it: the neuron axis
    as runs (``blocks``) of one projection pair, and ``output_bias`` (D,): the output
    biases, the remainder's (``None``: none)."""

    blocks: list[FrozenNeuronBlock]
    output_bias: torch.Tensor | None

    @property
    def width(self) -> int:
        """Neurons of the axis (``W``)."""
        return self.blocks[-1].columns.stop

    @property
    def split_width(self) -> int:
        """The widest run: what one MLP chunk holds per position."""
        return max(block.width for block in self.blocks)

    @functools.cached_property
    def _out(self) -> torch.Tensor:
        """(D, W) the output projection of the whole axis (matmul dtype)."""
        if len(self.blocks) == 1:
            return self.blocks[0].out
        return torch.cat([b.out for b in self.blocks], dim=1)

    def output(self, act: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(.., D) the output projection of activations ``act`` (.., W), in ``dtype``."""
        return project(act, self._out, dtype)

    def directions(self, neurons: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(K, D) the output direction of each of the ``neurons`` (K,), in ``dtype``."""
        return self._out[:, neurons].to(dtype).T


def freeze_blocks(
    blocks: Sequence[NeuronBlock],
    routes: Sequence[torch.Tensor | None],
    input_bias: torch.Tensor | None,
    length: int,
    dtype: torch.dtype,
    matmul_dtype: torch.dtype,
    device: torch.device,
) -> FrozenNeurons:
    """``blocks`` cast for propagation on ``device`` (see :meth:`NeuronAxisMLP.freeze`)."""

    def freeze(block: NeuronBlock) -> FrozenNeuronBlock:
        if block.expert is not None and block.output.bias is not None:
            raise ValueError("an expert's output bias would need its routing weight")
        split_input = block.split_input
        routed = None
        if block.expert is not None:
            chosen = [(r == block.expert).any(-1) for r in routes]  # type: ignore[union-attr]
            routed = stack_padded([c.to(device) for c in chosen], length)
        return FrozenNeuronBlock(
            columns=block.columns,
            split_input=_cast(split_input.weight, device, matmul_dtype),  # (I_b, D)
            out=_cast(block.output.weight, device, matmul_dtype),  # (D, I_b)
            # (I_b,) the remainder's own pre-activation: the input bias, the pre-norm's bias
            remainder_bias=optional_sum(
                None if split_input.bias is None else _cast(split_input.bias, device, SPLIT_DTYPE),
                None
                if input_bias is None
                else (_cast(split_input.weight, device, dtype) @ input_bias).to(SPLIT_DTYPE),
            ),
            routed=routed,
        )

    frozen = [freeze(block) for block in blocks]
    output_bias = optional_sum(
        *(_cast(b.output.bias, device, dtype) for b in blocks if b.output.bias is not None)
    )
    return FrozenNeurons(frozen, output_bias)


@dataclass(frozen=True)
class FrozenMLP:
    """What one forward pass of an MLP leaves, per position: the true pre-activations
    ``gate`` and activations ``act`` (T, W), and for a mixture the chosen experts
    ``routes`` (T, k); ``W`` is the width :meth:`MixtureMLP.on_axis` expands to the neuron
    axis (a dense MLP's is already the axis)."""

    gate: torch.Tensor
    act: torch.Tensor
    routes: torch.Tensor | None = None


class NeuronAxisMLP:
    """What every MLP part shares: its neuron axis as runs of neurons that one projection
    pair serves (:meth:`blocks`: a dense MLP one run, a mixture one per expert and its
    shared expert), frozen for propagation (:meth:`freeze`) or read whole
    (:meth:`output_columns`). A part gives :meth:`blocks`; :mod:`engine.propagate` runs
    what :meth:`freeze` gives and reads no weight."""

    def blocks(self, layer: nn.Module) -> list[NeuronBlock]:
        raise NotImplementedError

    def freeze(
        self,
        layer: nn.Module,
        routes: Sequence[torch.Tensor | None],
        input_bias: torch.Tensor | None,
        length: int,
        dtype: torch.dtype,
        matmul_dtype: torch.dtype,
        device: torch.device,
    ) -> FrozenNeurons:
        """The frozen split inputs of ``layer``'s MLP for a batch of prompts.

        Args:
            routes: per prompt, the chosen experts (N, k) on the neuron axis
                (:meth:`on_axis`; ``None`` for a dense MLP): where each expert runs.
            input_bias: (D,) the pre-norm's bias (the remainder's), or ``None``.
            length: the batch's longest prompt (routing is zero-padded to it).
            dtype, matmul_dtype: of the biases, and of the projections.
        """
        return freeze_blocks(
            self.blocks(layer), routes, input_bias, length, dtype, matmul_dtype, device
        )

    def output_columns(self, layer: nn.Module) -> torch.Tensor:
        """(D, W) what each neuron of the axis writes per unit of activation: its column
        of its run's output projection (the runs are contiguous, in axis order)."""
        return torch.cat([block.output.weight for block in self.blocks(layer)], dim=1)


class DenseMLP(NeuronAxisMLP):
    """What every dense MLP part shares (:class:`GatedMLP`, :class:`PlainMLP`): one run of
    neurons that one split input projection (:meth:`split_input`) and one output
    projection serve at every position. A subclass says where its projections are.
    """

    down: str
    module: str
    transposed: bool

    #: (.., D) temporaries per row and position an MLP chunk holds beyond a dense MLP's.
    temporaries = 0

    @property
    def split_path(self) -> str:
        """The module whose output is the split's pre-activation."""
        raise NotImplementedError

    def hooks(self) -> list[Hook]:
        return [Hook(self.split_path, "output", "gate"), Hook(self.down, "input", "act")]

    def split_input(self, layer: nn.Module) -> ProjectionWeights:
        """(I, D) the projection whose per-component outputs decide the split, and its
        bias (given to the remainder)."""
        return _linear(layer.get_submodule(self.split_path), self.transposed)

    def output(self, layer: nn.Module) -> ProjectionWeights:
        """(D, I) the output projection."""
        return _linear(layer.get_submodule(self.down), self.transposed)

    def for_layer(self, layer: nn.Module) -> DenseMLP:
        """The part that serves ``layer``'s MLP (a dense MLP serves every layer)."""
        return self

    def width(self, layer: nn.Module) -> int:
        """Neurons of ``layer``'s MLP."""
        return int(self.split_input(layer).weight.shape[0])

    def split_width(self, layer: nn.Module) -> int:
        """The widest run of neurons one projection pair serves."""
        return self.width(layer)

    def trace_width(self, layer: nn.Module) -> int:
        """Per-position width of what the trace keeps (:class:`FrozenMLP`)."""
        return self.width(layer)

    def blocks(self, layer: nn.Module) -> list[NeuronBlock]:
        """The neuron axis as runs of one projection pair: a single one."""
        split_input = self.split_input(layer)
        width = split_input.weight.shape[0]
        return [NeuronBlock(slice(0, width), split_input, self.output(layer))]

    def neuron_name(self, layer: nn.Module, index: int) -> str:
        """The label of neuron ``index`` of the axis."""
        return f"N{index}"

    def frozen(self, layer: nn.Module, kept: dict[str, Any], batch: tuple[int, int]) -> FrozenMLP:
        """What the forward pass left, from what :meth:`hooks` kept; ``batch``: the
        forward's (prompts, positions), which these tensors already lead with."""
        return FrozenMLP(gate=kept["gate"], act=kept["act"])

    def on_axis(self, layer: nn.Module, frozen: FrozenMLP) -> FrozenMLP:
        """``frozen`` on the whole neuron axis (a dense MLP's already is)."""
        return frozen


@dataclass(frozen=True)
class GatedMLP(DenseMLP):
    """``down(act(gate(x)) * up(x))``; the split reads the gate. ``fused``: ``gate`` is a
    fused gate/up projection whose first half is the gate (Phi-3 ``gate_up_proj``)."""

    gate: str = "mlp.gate_proj"
    down: str = "mlp.down_proj"
    module: str = "mlp"
    fused: bool = False
    transposed: bool = False

    @property
    def split_path(self) -> str:
        return self.gate

    def hooks(self) -> list[Hook]:
        gate_kind: HookKind = "first_half" if self.fused else "output"
        return [Hook(self.gate, gate_kind, "gate"), Hook(self.down, "input", "act")]

    def split_input(self, layer: nn.Module) -> ProjectionWeights:
        projection = super().split_input(layer)
        if not self.fused:
            return projection
        width = projection.weight.shape[0] // 2
        bias = None if projection.bias is None else projection.bias[:width]
        return ProjectionWeights(projection.weight[:width], bias)


@dataclass(frozen=True)
class PlainMLP(DenseMLP):
    """``down(act(in_proj(x) + b))`` (GPT-2 ``c_fc``/``c_proj``, GPT-NeoX
    ``dense_h_to_4h``/``dense_4h_to_h``): each neuron is split by the components'
    pre-activations ``W_in c_m`` (the bias on the remainder's), which add up to the true
    pre-activation."""

    in_proj: str = "mlp.c_fc"
    down: str = "mlp.c_proj"
    module: str = "mlp"
    transposed: bool = False

    @property
    def split_path(self) -> str:
        return self.in_proj


@dataclass(frozen=True)
class MixtureMLP(NeuronAxisMLP):
    """A sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks ``k``
    experts per position with weights, and the output is the weighted sum of those
    experts' gated MLPs (plus, Qwen2-MoE, a shared expert times ``sigmoid(w_s x)``).

    The routing is frozen: the chosen experts and their weights (the inputs of the
    ``experts`` module, which stores every expert's weights as one (E, 2I, D) ``gate_up_proj``
    and one (E, D, I) ``down_proj``), and the shared expert's sigmoid gate. The layer's
    neuron axis is every expert's neurons, expert by expert, then the shared expert's; a
    neuron's frozen activation is its expert's activation times the routing weight (zero
    where the expert was not chosen), and each neuron is split by its gate like a dense
    MLP's. ``dense``: the part of layers whose MLP is not a mixture (Qwen2-MoE's
    ``mlp_only_layers``).
    """

    module: str = "mlp"
    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    shared: GatedMLP | None = None
    shared_up: str | None = None
    shared_gate: str | None = None
    dense: DenseMLP = field(default_factory=GatedMLP)

    #: An expert's output at its positions, and the chunk's sum over experts.
    temporaries = 2

    def for_layer(self, layer: nn.Module) -> MixtureMLP | DenseMLP:
        """This part for a layer whose MLP has experts, else :attr:`dense`."""
        try:
            layer.get_submodule(self.experts)
        except AttributeError:
            return self.dense
        return self

    def hooks(self) -> list[Hook]:
        # the experts' inputs: flattened positions, chosen experts, their weights
        return [Hook(self.experts, "arguments", "routed")]

    def _experts(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.experts)

    def _expert_counts(self, layer: nn.Module) -> tuple[int, int]:
        """Experts, and neurons per expert."""
        down = module_tensor(self._experts(layer), "down_proj")  # (E, D, I)
        return int(down.shape[0]), int(down.shape[2])

    def _shared_width(self, layer: nn.Module) -> int:
        return 0 if self.shared is None else self.shared.width(layer)

    def width(self, layer: nn.Module) -> int:
        experts, per_expert = self._expert_counts(layer)
        return experts * per_expert + self._shared_width(layer)

    def split_width(self, layer: nn.Module) -> int:
        return max(self._expert_counts(layer)[1], self._shared_width(layer))

    def trace_width(self, layer: nn.Module) -> int:
        chosen = int(layer.get_submodule(self.router).top_k)  # type: ignore[arg-type]
        return chosen * self._expert_counts(layer)[1] + self._shared_width(layer)

    def blocks(self, layer: nn.Module) -> list[NeuronBlock]:
        """One block per expert (its gate rows and down projection), then the shared one."""
        module = self._experts(layer)
        experts, size = self._expert_counts(layer)
        gate_up = module_tensor(module, "gate_up_proj").detach()
        down = module_tensor(module, "down_proj").detach()
        blocks = [
            NeuronBlock(
                slice(e * size, (e + 1) * size),
                ProjectionWeights(gate_up[e, :size], None),
                ProjectionWeights(down[e], None),
                expert=e,
            )
            for e in range(experts)
        ]
        if self.shared is not None:
            (shared,) = self.shared.blocks(layer)
            lo = experts * size
            columns = slice(lo, lo + shared.columns.stop)
            blocks.append(NeuronBlock(columns, shared.split_input, shared.output))
        return blocks

    def neuron_name(self, layer: nn.Module, index: int) -> str:
        """``E<expert>.N<neuron>``, or ``S.N<neuron>`` for the shared expert's."""
        experts, size = self._expert_counts(layer)
        if index >= experts * size:
            return f"S.N{index - experts * size}"
        return f"E{index // size}.N{index % size}"

    def frozen(self, layer: nn.Module, kept: dict[str, Any], batch: tuple[int, int]) -> FrozenMLP:
        """The chosen experts' (and the shared expert's) pre-activations and weighted
        activations at each position, recomputed from the experts' input with the routing
        the forward pass chose: (B, T, k I [+ I_s]) slot by slot (the experts' input is
        flattened over the ``batch`` of (prompts, positions))."""
        x, routes, weights = kept["routed"][:3]  # (B T, D), (B T, k), (B T, k)
        module = self._experts(layer)
        gate_up, act_fn = module_tensor(module, "gate_up_proj"), _activation(module)
        size = module_tensor(module, "down_proj").shape[2]
        slots = routes.shape[1]
        gate = x.new_zeros(x.shape[0], slots, size)
        act = x.new_zeros(x.shape[0], slots, size)
        for e in routes.unique().tolist():
            rows, slot = torch.where(routes == e)
            g, up = torch.nn.functional.linear(x[rows], gate_up[e]).chunk(2, dim=-1)
            gate[rows, slot] = g
            act[rows, slot] = act_fn(g) * up * weights[rows, slot, None].to(x.dtype)
        gates, acts = [gate.flatten(1)], [act.flatten(1)]
        if self.shared is not None:
            shared = layer.get_submodule(self.shared.module)
            g = layer.get_submodule(self.shared.gate)(x)
            assert self.shared_up is not None  # named with every shared expert
            up = layer.get_submodule(self.shared_up)(x)
            act = _activation(shared)(g) * up
            if self.shared_gate is not None:  # frozen per position
                act = act * torch.sigmoid(layer.get_submodule(self.shared_gate)(x))
            gates.append(g)
            acts.append(act)
        return FrozenMLP(
            gate=torch.cat(gates, -1).view(*batch, -1),
            act=torch.cat(acts, -1).view(*batch, -1),
            routes=routes.view(*batch, -1),
        )

    def on_axis(self, layer: nn.Module, frozen: FrozenMLP) -> FrozenMLP:
        """``frozen`` (slot by slot) on the neuron axis: zero where an expert was not chosen."""
        experts, size = self._expert_counts(layer)
        routes = frozen.routes
        assert routes is not None
        positions, slots = routes.shape
        routed = slots * size
        columns = routes[..., None] * size + torch.arange(size, device=routes.device)
        columns = columns.reshape(positions, routed)
        out = []
        for values in (frozen.gate, frozen.act):
            full = values.new_zeros(positions, self.width(layer))
            full[:, : experts * size].scatter_(1, columns, values[:, :routed])
            full[:, experts * size :] = values[:, routed:]
            out.append(full)
        return FrozenMLP(gate=out[0], act=out[1], routes=routes)


# ---------------------------------------------------------------------------- read-out


@dataclass(frozen=True)
class Readout:
    """The unembedding (``path``), and the config attribute of a final soft-cap
    ``c tanh(logit / c)`` (Gemma 2): scores then add up to the logit before the cap."""

    path: str = "lm_head"
    softcap_attr: str | None = None

    def vocab_size(self, unembed: nn.Module) -> int:
        """Rows of the unembedding ``unembed`` (the module at :attr:`path`)."""
        return int(module_tensor(unembed).shape[0])

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
