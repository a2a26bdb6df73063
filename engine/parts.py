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
- **MLPs** (:class:`GatedMLP`, fused or not, :class:`PlainMLP`, ``act(W_in x + b)``, and
  :class:`MixtureMLP`, a mixture of experts with its routing frozen). All freeze the
  true pre-activations ``g`` of the split input projection and the neuron activations
  ``a``; a gated MLP's ``g`` is its gate, a plain MLP's the pre-activation itself (its
  bias on the remainder's), so every split rule applies to all unchanged. An MLP is one
  or more :class:`NeuronBlock` runs of one neuron axis: a dense MLP one, a mixture one
  per expert (each expert's activations times its frozen routing weight) and its shared
  expert.
- **Read-out** (:class:`Readout`): the unembedding, with an optional final soft-cap.

Each part lists the hooks it needs (:meth:`hooks`) as ``(path, kind, key)`` triples;
:mod:`engine.capture` installs them and knows no family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
class NeuronBlock:
    """A run of neurons of a layer's neuron axis that one input and one output projection
    serve: ``columns`` of the axis, ``split_input`` (I_b, D) and ``output`` (D, I_b).
    ``expert``: the routed expert these neurons belong to (``None``: they run at every
    position), so that propagation computes them only where that expert was chosen."""

    columns: slice
    split_input: ProjectionWeights
    output: ProjectionWeights
    expert: int | None = None


@dataclass(frozen=True)
class FrozenMLP:
    """What one forward pass of an MLP leaves, per position: the true pre-activations
    ``gate`` and activations ``act`` (T, W), and for a mixture the chosen experts
    ``routes`` (T, k); ``W`` is the width :meth:`MixtureMLP.on_axis` expands to the neuron
    axis (a dense MLP's is already the axis)."""

    gate: torch.Tensor
    act: torch.Tensor
    routes: torch.Tensor | None = None


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

    #: (.., D) temporaries per row and position an MLP chunk holds beyond a dense MLP's.
    temporaries = 0

    def for_layer(self, layer: nn.Module) -> GatedMLP:
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
class PlainMLP(GatedMLP):
    """``out(act(in(x) + b))`` (GPT-2, GPT-NeoX): each neuron is split by the components'
    pre-activations ``W_in c_m`` (the bias on the remainder's), which add up to the true
    pre-activation."""

    gate: str = "mlp.c_fc"
    down: str = "mlp.c_proj"


@dataclass(frozen=True)
class MixtureMLP:
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
    dense: GatedMLP = field(default_factory=GatedMLP)

    #: An expert's output at its positions, and the chunk's sum over experts.
    temporaries = 2

    def for_layer(self, layer: nn.Module) -> MixtureMLP | GatedMLP:
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
        down = self._experts(layer).down_proj  # (E, D, I)
        return int(down.shape[0]), int(down.shape[2])

    def _shared_width(self, layer: nn.Module) -> int:
        return 0 if self.shared is None else self.shared.width(layer)

    def width(self, layer: nn.Module) -> int:
        experts, per_expert = self._expert_counts(layer)
        return experts * per_expert + self._shared_width(layer)

    def split_width(self, layer: nn.Module) -> int:
        return max(self._expert_counts(layer)[1], self._shared_width(layer))

    def trace_width(self, layer: nn.Module) -> int:
        chosen = int(layer.get_submodule(self.router).top_k)
        return chosen * self._expert_counts(layer)[1] + self._shared_width(layer)

    def blocks(self, layer: nn.Module) -> list[NeuronBlock]:
        """One block per expert (its gate rows and down projection), then the shared one."""
        module = self._experts(layer)
        experts, size = self._expert_counts(layer)
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
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
        size = module.down_proj.shape[2]
        slots = routes.shape[1]
        gate = x.new_zeros(x.shape[0], slots, size)
        act = x.new_zeros(x.shape[0], slots, size)
        for e in routes.unique().tolist():
            rows, slot = torch.where(routes == e)
            g, up = torch.nn.functional.linear(x[rows], module.gate_up_proj[e]).chunk(2, dim=-1)
            gate[rows, slot] = g
            act[rows, slot] = module.act_fn(g) * up * weights[rows, slot, None].to(x.dtype)
        gates, acts = [gate.flatten(1)], [act.flatten(1)]
        if self.shared is not None:
            shared = layer.get_submodule(self.shared.module)
            g = layer.get_submodule(self.shared.gate)(x)
            up = layer.get_submodule(self.shared_up)(x)
            act = shared.act_fn(g) * up
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
