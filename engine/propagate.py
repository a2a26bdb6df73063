"""Carry components through the network with the forward pass's nonlinear parts frozen.

Stages are numbered ``2l`` (attention block of layer ``l``) and ``2l + 1`` (MLP block of
layer ``l``); a run goes from a start stage up to, not including, an end stage.

- **Attention** (linear once ``A`` is frozen): component ``m`` gains
  ``W_O (A (W_V (s * w * c_m)))``, mixed per key/value head in head space (``d_h`` wide)
  before the output projection. Value and output biases go to the remainder.
- **MLP**: component ``m`` gains ``W_down(share_m)`` with ``share_m`` from
  :mod:`engine.splits`, computed over chunks of positions so that the
  (components x positions x neurons) gate tensor stays under the memory budget.

Causality: a component whose first non-zero position is ``p`` stays zero before ``p`` at
every layer (attention looks back only, the MLP is per position). Components are kept
sorted by that first position, so attention skips the zero rows of each block of
components and each MLP chunk only touches the components already alive there.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine.adapters import ArchitectureAdapter, norm_weight, rms_scale
from engine.capture import ForwardTrace
from engine.splits import SplitRule, SplitSpec, neuron_shares


class Cancelled(RuntimeError):
    """The caller's ``should_stop`` asked to stop; the partial work was thrown away."""


def attention_stage(layer: int) -> int:
    """Stage index of the attention block of ``layer``."""
    return 2 * layer


def mlp_stage(layer: int) -> int:
    """Stage index of the MLP block of ``layer``."""
    return 2 * layer + 1


@dataclass(frozen=True)
class SplitSettings:
    """The MLP split rule and the first-token rule of one run."""

    rule: SplitRule = "softmax"
    temperature: float = 0.1
    ignore_first: bool = False


@dataclass
class Start:
    """Where and how a decomposition begins (built by :mod:`engine.granularity`)."""

    values: torch.Tensor  # (M + 1, N, D), remainder last
    first_position: torch.Tensor  # (M,) long: first position where each may be non-zero
    anchor: int | None  # component holding the first token (position-0 and first-token rules)
    stage: int  # first stage to run
    labels: list[str]  # M labels (the remainder is reported apart)
    # The anchor is the first token alone (a group spanning more keeps the first-token rule off).
    anchor_alone: bool = True
    # Parts whose gates below 1e-5 count as absent, like the remainder's.
    floored: tuple[int, ...] = ()


@dataclass
class Snapshot:
    """Components entering ``layer`` (``L``: the pre-norm output), at the kept positions."""

    layer: int
    values: torch.Tensor  # (M + 1, P, D) in the caller's component order, remainder last
    total: torch.Tensor  # (N, D) sum of all components at every position


class LayerWeights:
    """One layer's weights and frozen scales, in the compute dtype on the layer's device."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        trace: ForwardTrace,
        layer: int,
        dtype: torch.dtype,
    ) -> None:
        part = lambda role: adapter.layer_part(model, layer, role)  # noqa: E731
        frozen = trace.layers[layer]
        v_proj, o_proj = part("v_proj"), part("o_proj")
        self.device = o_proj.weight.device
        cast = lambda t: t.detach().to(self.device, dtype)  # noqa: E731

        in_norm, mid_norm = part("input_norm"), part("post_attention_norm")
        # (N, D) frozen per-position norm scale times the norm's gain
        self.in_scale = cast(rms_scale(in_norm, frozen.resid_pre, adapter)) * cast(
            norm_weight(in_norm, adapter)
        )
        self.mid_scale = cast(rms_scale(mid_norm, frozen.resid_mid, adapter)) * cast(
            norm_weight(mid_norm, adapter)
        )
        self.w_v = cast(v_proj.weight)  # (H_kv * d_h, D)
        self.w_o = cast(o_proj.weight)  # (D, H * d_h)
        self.probs = cast(frozen.probs)  # (H, N, N)
        self.num_heads = int(frozen.probs.shape[0])
        self.head_dim = self.w_o.shape[1] // self.num_heads
        self.num_kv_heads = self.w_v.shape[0] // self.head_dim

        # Biases belong to no input: (D,) attention bias output, given to the remainder.
        bias = torch.zeros(self.w_o.shape[0], device=self.device, dtype=dtype)
        if v_proj.bias is not None:
            group = self.num_heads // self.num_kv_heads
            b_v = cast(v_proj.bias).view(self.num_kv_heads, 1, self.head_dim)
            bias += self.w_o @ b_v.expand(-1, group, -1).reshape(-1)
        if o_proj.bias is not None:
            bias += cast(o_proj.bias)
        self.attn_bias = bias

        gate_proj, down_proj = part("gate_proj"), part("down_proj")
        self.w_gate = cast(gate_proj.weight)  # (I, D)
        self.w_down = cast(down_proj.weight)  # (D, I)
        self.mlp_bias = cast(down_proj.bias) if down_proj.bias is not None else None
        self.act = cast(frozen.act)  # (N, I)
        self.gate = cast(frozen.gate)  # (N, I)

    def head_context(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Attention-mixed values of normalised inputs.

        Args:
            x: (B, N', D) normalised components at positions ``start..N-1``.
            start: first position; components are zero before it.

        Returns:
            (B, N', H * d_h) per-head contexts, laid out as the output projection reads.
        """
        batch, length, _ = x.shape
        kv, dh = self.num_kv_heads, self.head_dim
        group = self.num_heads // kv
        values = (x @ self.w_v.T).view(batch, length, kv, dh)  # (B, N', H_kv, d_h)
        values = values.permute(2, 1, 0, 3).reshape(kv, length, batch * dh)
        probs = self.probs[:, start:, start:].reshape(kv, group * length, length)
        context = torch.bmm(probs, values)  # (H_kv, G * N', B * d_h)
        context = context.view(kv, group, length, batch, dh).permute(3, 2, 0, 1, 4)
        return context.reshape(batch, length, self.num_heads * dh)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(H, N, D) each head's attention output for one normalised input ``x`` (N, D)."""
        context = self.head_context(x[None])[0].view(x.shape[0], self.num_heads, self.head_dim)
        w_o = self.w_o.view(-1, self.num_heads, self.head_dim)  # (D, H, d_h)
        return torch.einsum("nhd,ehd->hne", context, w_o)


class Propagator:
    """Runs components from a start stage to an end stage for one traced prompt."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        trace: ForwardTrace,
        dtype: torch.dtype,
        budget_bytes: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.model = model
        self.should_stop = should_stop
        self.adapter = adapter
        self.trace = trace
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self._weights: dict[int, LayerWeights] = {}

    def weights(self, layer: int) -> LayerWeights:
        """Weights of ``layer`` (kept while this propagator lives, one layer at a time)."""
        if layer not in self._weights:
            self._weights.clear()
            self._weights[layer] = LayerWeights(
                self.model, self.adapter, self.trace, layer, self.dtype
            )
        return self._weights[layer]

    def run(
        self,
        start: Start,
        split: SplitSettings,
        end_layer: int,
        positions: torch.Tensor,
        every_layer: bool = False,
    ) -> list[Snapshot]:
        """Propagate ``start`` (its values are consumed) and return snapshots.

        Args:
            start: the initial components and their facts.
            split: MLP split settings.
            end_layer: stop at the residual entering this layer (``L``: before the norm).
            positions: (P,) positions to keep in the snapshots.
            every_layer: snapshot the residual entering every layer from the start on;
                otherwise only the end.
        """
        # Internal layout: row 0 is the remainder, rows 1..M the components sorted by
        # first position, so that the rows alive in a chunk are one contiguous slice.
        count = start.values.shape[0] - 1
        order = torch.argsort(start.first_position, stable=True)
        inverse = torch.argsort(order) + 1  # caller's index -> internal row
        remainder_row = torch.tensor([count])
        values = start.values[torch.cat([remainder_row, order])]
        restore = torch.cat([inverse, torch.tensor([0])])  # internal -> caller's, remainder last
        first = start.first_position[order].tolist()
        facts = _SortedFacts(
            anchor=None if start.anchor is None else int(inverse[start.anchor]),
            floored=tuple(int(inverse[i]) for i in start.floored),
            ignore_anchor=split.ignore_first and start.anchor_alone,
        )
        start_stage = start.stage

        snapshots: list[Snapshot] = []

        def snap(layer: int) -> None:
            kept = values[:, positions.to(values.device)][restore.to(values.device)]
            snapshots.append(Snapshot(layer=layer, values=kept, total=values.sum(0)))

        if every_layer and start_stage % 2 == 0:
            snap(start_stage // 2)
        for stage in range(start_stage, 2 * end_layer):
            self.check()
            layer = stage // 2
            weights = self.weights(layer)
            values = values.to(weights.device)
            if stage % 2 == 0:
                self._attention(weights, values, first)
            else:
                self._mlp(weights, values, first, facts, split)
                if every_layer:
                    snap(layer + 1)
        if not snapshots or snapshots[-1].layer != end_layer:
            snap(end_layer)
        self._weights.clear()
        return snapshots

    def check(self) -> None:
        """Raise :class:`Cancelled` when the caller asks to stop (between units of work)."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("the attribution was cancelled")

    def _attention(self, w: LayerWeights, values: torch.Tensor, first: list[int]) -> None:
        """Add each component's attention output, in blocks of components (in place)."""
        rows, length, hidden = values.shape
        per_row = (3 * hidden + 2 * w.w_v.shape[0] + 2 * w.w_o.shape[1]) * values.element_size()
        block = max(1, min(self.budget_bytes // max(1, per_row * length), _causal_block(length)))
        self._attend_rows(w, values, 0, 1, 0)  # the remainder
        for lo in range(1, rows, block):
            self._attend_rows(w, values, lo, min(rows, lo + block), first[lo - 1])
        values[0] += w.attn_bias

    @staticmethod
    def _attend_rows(w: LayerWeights, values: torch.Tensor, lo: int, hi: int, p0: int) -> None:
        rows = values[lo:hi, p0:]  # (B, N', D) view, zero before p0
        context = w.head_context(rows * w.in_scale[p0:], start=p0)
        rows += context @ w.w_o.T

    def _mlp(
        self,
        w: LayerWeights,
        values: torch.Tensor,
        first: list[int],
        facts: _SortedFacts,
        split: SplitSettings,
    ) -> None:
        """Add each component's share of the MLP output, in chunks of positions (in place)."""
        rows, length, hidden = values.shape
        neurons = w.w_gate.shape[0]
        per_position = rows * (2 * hidden + 3 * neurons) * values.element_size()
        chunk = max(1, min(self.budget_bytes // max(1, per_position), length))
        if first and first[-1] > 0:  # components start late: smaller chunks skip more zeros
            chunk = min(chunk, _causal_block(length))
        spec = SplitSpec(
            rule=split.rule,
            temperature=split.temperature,
            anchor=facts.anchor,
            ignore_anchor=facts.ignore_anchor,
            starts_at_zero=True,
        )
        scale = w.mid_scale * spec.gate_scale  # (N, D) frozen norm, and 1 / T for softmax
        for p0 in range(0, length, chunk):
            self.check()
            p1 = min(length, p0 + chunk)
            live = 1 + bisect.bisect_left(first, p1)  # the remainder and the components alive
            block = values[:live, p0:p1]  # (live, P, D) view
            gates = (block * scale[p0:p1]) @ w.w_gate.T  # (live, P, I)
            chunk_spec = replace(
                spec,
                anchor=spec.anchor if spec.anchor is not None and spec.anchor < live else None,
                starts_at_zero=p0 == 0,
                floored=(0, *(i for i in facts.floored if i < live)),
            )
            shares = neuron_shares(gates, w.act[p0:p1], w.gate[p0:p1], chunk_spec)
            block += shares @ w.w_down.T  # (live, P, D)
        if w.mlp_bias is not None:
            values[0] += w.mlp_bias


@dataclass(frozen=True)
class _SortedFacts:
    """Start facts re-indexed to the sorted component order."""

    anchor: int | None
    floored: tuple[int, ...]
    ignore_anchor: bool  # the first-token rule is on and applies to the anchor


def _causal_block(length: int) -> int:
    """Block size that keeps causal skipping effective without tiny matrix products."""
    return max(8, -(-length // 8))
