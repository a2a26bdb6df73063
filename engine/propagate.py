"""Carry components through the network with the forward pass's nonlinear parts frozen.

Stages are numbered ``2l`` (attention block of layer ``l``) and ``2l + 1`` (MLP block of
layer ``l``); a run goes from a start stage up to, not including, an end stage.

- **Attention** (linear once ``A`` is frozen): component ``m`` gains
  ``W_O (A (W_V (s * w * c_m)))``, mixed per key/value head in head space (``d_h`` wide)
  before the output projection. Value and output biases go to the remainder.
- **MLP**: component ``m`` gains ``W_down(share_m)`` with ``share_m`` from
  :mod:`engine.splits`, computed over chunks of positions so that the
  (components x positions x neurons) gate tensor stays under the memory budget.

Each sub-block runs its family's parts in order (engine/parts.py): the frozen pre-norm
(identity when the family has none), the mixer, the frozen post-norm; a parallel layer's
MLP reads the components that entered the layer. No family is named here.

Layout: components are held as one ``(M + 1, R, N, D)`` tensor: row 0 is the remainder,
rows ``1..M`` the components sorted by the first position where they may be non-zero,
``R`` the prompts of a batch (padded to the longest with zero positions and zero
components, which stay exactly zero), ``N`` positions, ``D`` the hidden size.

Causality: a component whose first non-zero position is ``p`` stays zero before ``p`` at
every layer (attention looks back only, the MLP is per position). Because rows are sorted
by that position, attention skips the zero positions of each block of rows, and each MLP
chunk only touches the rows already alive there (one contiguous slice).

Precision: matrix products run in ``matmul_dtype`` (the model's bfloat16 on a GPU, say,
with the hardware's float32 accumulation); the components, their sums and the MLP split
stay in the compute dtype (float32 by default), which keeps conservation tight.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from engine.capture import ForwardTrace, LayerTrace
from engine.families import Family
from engine.memory import attention_block, attention_row_bytes, mlp_chunk, mlp_position_bytes
from engine.parts import (
    IDENTITY,
    SPLIT_DTYPE,
    AttentionOperator,
    FrozenNeuronBlock,
    FrozenNeurons,
    FrozenNorm,
    stack_padded,
)
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
    """The MLP split rule and the first-token rule of one run (the request's
    ``ignore_bos``, its default decided by the granularity)."""

    rule: SplitRule = "softmax"
    temperature: float = 0.1
    first_token_rule: bool = False


@dataclass
class Start:
    """Where and how a decomposition begins (built by :mod:`engine.granularity`).

    ``values`` is in the propagation layout: row 0 the remainder, then the components
    sorted by ``first_position``; ``output_rows`` maps the caller's component order back.
    """

    values: torch.Tensor  # (M + 1, N, D), remainder first, components sorted by first position
    first_position: list[int]  # (M,) non-decreasing: first position where row 1 + m may be non-zero
    output_rows: list[int]  # (M,) row of the caller's component j (labels order)
    anchor: int | None  # row holding the first token (position-0 and first-token rules)
    stage: int  # first stage to run
    labels: list[str]  # M labels, in the caller's order (the remainder is reported apart)
    # The anchor is the first token alone (a group spanning more keeps the first-token rule off).
    first_token_alone: bool = True
    # Rows whose gates below 1e-5 count as absent, like the remainder's (row 0, always).
    floored: tuple[int, ...] = ()
    # Each component is non-zero at its first position only, and row 1 + m at position m
    # in every prompt of a batch (token components): the first attention stage then
    # projects each component once instead of at every position.
    single_position: bool = False
    # Starts at an MLP stage: the rows that entered the layer (the others are attention
    # outputs), which a parallel layer's MLP reads alone.
    entering_rows: tuple[int, ...] = ()

    def facts(self, split: SplitSettings) -> StartFacts:
        """What the MLP split needs to know of this start (equal facts can share a batch)."""
        return StartFacts(
            anchor=self.anchor,
            floored=(0, *self.floored),
            first_token_rule=split.first_token_rule and self.first_token_alone,
        )


@dataclass(frozen=True)
class StartFacts:
    """Row facts of a start that the MLP split uses."""

    anchor: int | None
    floored: tuple[int, ...]
    first_token_rule: bool  # the first-token rule is on and applies to the anchor


@dataclass
class Snapshot:
    """Components entering ``layer`` (``L``: the pre-norm output), at the kept positions."""

    layer: int
    values: torch.Tensor  # (M + 1, P, D): the remainder, then the caller's component order
    total: torch.Tensor  # (P, D) sum of all components at the kept positions


@dataclass
class Member:
    """One prompt of a batch: its start, its length and the positions to snapshot."""

    start: Start
    length: int  # N of this prompt (the batch may be padded beyond it)
    positions: torch.Tensor  # (P,) long
    snapshots: list[Snapshot] = field(default_factory=list)


class LayerWeights:
    """One layer's frozen parts for a batch of prompts, as its family's parts give them.

    ``attention`` (:class:`engine.parts.AttentionOperator`) and ``neurons``
    (:class:`engine.parts.FrozenNeurons`) hold the projections in the matmul dtype; the
    frozen norms and per-position quantities (padded to the batch's longest prompt with
    zeros, which keeps padded positions at exactly zero) are in the compute dtype, except
    the attention probabilities, which feed a matrix product. No weight is read here.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        traces: Sequence[ForwardTrace],
        layer: int,
        dtype: torch.dtype,
        matmul_dtype: torch.dtype,
    ) -> None:
        module = family.layer(model, layer)
        frozen = [trace.layers[layer] for trace in traces]
        length = max(trace.num_tokens for trace in traces)
        self.device = next(module.parameters()).device
        self.dtype = dtype
        self.matmul_dtype = matmul_dtype
        cast = self._cast
        stack = lambda ts, to=dtype: stack_padded([cast(t, to) for t in ts], length)  # noqa: E731

        # Each norm frozen at its true input's scale: (R, N, D) inverse scale times gain.
        norms: dict[str, FrozenNorm] = {
            role: part.freeze(
                module.get_submodule(part.path),
                stack([f.scales[role] for f in frozen]),
                self.device,
                dtype,
            )
            for role, part in family.norms()
        }
        self.attn_norm = norms.get("attn_norm", IDENTITY)
        self.attn_post = norms.get("attn_post_norm", IDENTITY)
        self.mlp_norm = norms.get("mlp_norm", IDENTITY)
        self.mlp_post = norms.get("mlp_post_norm", IDENTITY)

        # The attention operator is frozen when first used: a run that only reads the
        # MLP (neurons scored in reverse mode) does not recompute the probabilities of a
        # trace that does not keep them.
        self._freeze_attention = functools.partial(
            self._attention_of, module, family, model.config, frozen, length
        )

        # The MLP's neuron axis, as runs of neurons sharing one projection pair (one run
        # for a dense MLP; one per expert, and the shared expert, for a mixture).
        part = family.mlp.for_layer(module)
        on_axis = [part.on_axis(module, f.frozen_mlp) for f in frozen]
        self.neuron_name = lambda index: part.neuron_name(module, index)
        self.neurons: FrozenNeurons = part.freeze(
            module,
            [f.routes for f in on_axis],
            self.mlp_norm.shift,
            length,
            dtype,
            matmul_dtype,
            self.device,
        )
        self.split_width = self.neurons.split_width
        down_bias = self.neurons.output_bias
        self.mlp_bias = (
            _through_post(self.mlp_post, down_bias)
            if down_bias is not None or self.mlp_post.shift is not None
            else None
        )
        # (R, N, I) in float32: the split's dtype, whatever the components'
        self.act = stack([f.act for f in on_axis], SPLIT_DTYPE)
        self.gate = stack([f.gate for f in on_axis], SPLIT_DTYPE)

    def _cast(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` on this layer's device, in ``dtype`` (default: the compute dtype)."""
        return tensor.detach().to(self.device, dtype or self.dtype)

    def _attention_of(
        self,
        module: nn.Module,
        family: Family,
        config: object,
        frozen: Sequence[LayerTrace],
        length: int,
    ) -> AttentionOperator:
        # (R, H, N, N): padded with zero rows and columns
        probs = torch.stack(
            [
                _pad_square(self._cast(f.attention_probs(), self.matmul_dtype), length)
                for f in frozen
            ]
        )
        return family.attention.freeze(
            module, config, probs, self.attn_norm.shift, self.dtype, self.matmul_dtype
        )

    @functools.cached_property
    def attention(self) -> AttentionOperator:
        """The layer's frozen attention operator (:class:`engine.parts.AttentionOperator`)."""
        return self._freeze_attention()

    @functools.cached_property
    def attn_bias(self) -> torch.Tensor:
        """What the attention biases add, the remainder's, through the post-norm when
        there is one: (D,) or (R, N, D)."""
        return _through_post(self.attn_post, self.attention.constant)

    @property
    def probs(self) -> torch.Tensor:
        """(R, H, N, N) the frozen attention probabilities (matmul dtype)."""
        return self.attention.probs

    def attend(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The frozen attention block's output (biases apart) for inputs ``x``.

        Args:
            x: (B, R, N', D) components (before the pre-norm) at positions
                ``start..N-1``; zero before ``start``.

        Returns:
            (B, R, N', D) in the compute dtype: pre-norm, values, mixing with the frozen
            probabilities, output projection and post-norm, all linear.
        """
        where = (slice(None), slice(start, None))
        normed = self.attn_norm(x, self.attn_norm.at(*where))
        out = self.attention.output(self.attention.head_context(normed, start=start), self.dtype)
        return self.attn_post(out, self.attn_post.at(*where))

    def head_outputs(self, resid: torch.Tensor, member: int = 0) -> torch.Tensor:
        """(H, N, D) each head's share of the attention block's output (through the
        post-norm, if any; biases apart) for the residual ``resid`` (N, D) entering the
        layer, of batch member ``member``."""
        length = resid.shape[0]
        own = (member, slice(None, length))
        x = self.attn_norm(resid, self.attn_norm.at(*own))
        probs = self.probs[member : member + 1, :, :length, :length]
        context = self.attention.head_context(x[None, None], probs=probs)[0, 0]
        heads = self.attention.head_outputs(context, self.dtype)
        return self.attn_post(heads, self.attn_post.at(*own))

    def neuron_outputs(self, act: torch.Tensor, member: int = 0) -> torch.Tensor:
        """(..., N, D) the MLP block's output for activations ``act`` (..., N, I) of batch
        member ``member`` (through the post-norm, if any; biases apart)."""
        out = self.neurons.output(act, self.dtype)
        own = (member, slice(None, act.shape[-2]))
        return self.mlp_post(out, self.mlp_post.at(*own))

    @staticmethod
    def bias_of(bias: torch.Tensor | None, member: int, like: torch.Tensor) -> torch.Tensor:
        """A bias term ((D,) or (R, N, D)) at the positions of member ``member``, shaped
        like ``like`` (N, D); zero when ``bias`` is ``None``."""
        if bias is None:
            return torch.zeros_like(like)
        if bias.dim() == 1:
            return bias.to(like.dtype).expand_as(like)
        return bias[member, : like.shape[0]].to(like.dtype)


def _pad_square(probs: torch.Tensor, length: int) -> torch.Tensor:
    """(H, n, n) attention probabilities zero-padded to (H, length, length)."""
    n = probs.shape[-1]
    if n == length:
        return probs
    return torch.nn.functional.pad(probs, (0, length - n, 0, length - n))


def _through_post(post: FrozenNorm, bias: torch.Tensor | None) -> torch.Tensor:
    """A mixer's bias (D,) through its frozen post-norm, plus the post-norm's own bias:
    (D,) without a post-norm, else (R, N, D) (the post-norm scales each position)."""
    if post.shift is None and (bias is None or not bool(bias.any())):
        if bias is not None:
            return bias
        assert post.scale is not None, "no bias, and no post-norm to give a zero one its width"
        return post.scale.new_zeros(post.scale.shape[-1])
    if post.identity:
        assert bias is not None  # a non-zero one: the identity has no shift
        return bias
    assert post.scale is not None  # not IDENTITY: a norm frozen with its scale
    out = (
        torch.zeros_like(post.scale)
        if bias is None
        else post(bias.expand_as(post.scale), post.scale)
    )
    return out if post.shift is None else out + post.shift


class Propagator:
    """Runs the components of a batch of prompts (one trace each, the same start stage,
    split settings and start facts) from a start stage to an end stage.

    Args:
        budget_bytes: memory the chunked working set may use at once (attention blocks
            of rows, MLP chunks of positions); the components themselves are apart.
        matmul_dtype: dtype of the matrix products (default: ``dtype``).
        fused_split: compute the softmax MLP split with one compiled kernel.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        traces: Sequence[ForwardTrace],
        dtype: torch.dtype,
        budget_bytes: int,
        should_stop: Callable[[], bool] | None = None,
        matmul_dtype: torch.dtype | None = None,
        fused_split: bool = False,
        on_mlp: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.fused_split = fused_split
        # Called with (layer, the components' pre-activations summed (R, P, I), the true
        # ones (R, P, I)) for each MLP chunk: a check that the split reads what the MLP
        # reads (tests; None in service).
        self.on_mlp = on_mlp
        self.should_stop = should_stop
        self.family = family
        self.traces = list(traces)
        self.dtype = dtype
        self.matmul_dtype = matmul_dtype or dtype
        self.budget_bytes = budget_bytes
        self._weights: dict[int, LayerWeights] = {}

    def weights(self, layer: int) -> LayerWeights:
        """Weights of ``layer`` (kept while this propagator lives, one layer at a time)."""
        if layer not in self._weights:
            self._weights.clear()
            self._weights[layer] = LayerWeights(
                self.model, self.family, self.traces, layer, self.dtype, self.matmul_dtype
            )
        return self._weights[layer]

    def run(
        self,
        members: Sequence[Member],
        split: SplitSettings,
        end_layer: int,
        every_layer: bool = False,
    ) -> None:
        """Propagate each member's start (consumed) and fill its ``snapshots``.

        Args:
            members: one per trace, in the traces' order; equal start stages and facts.
            split: MLP split settings.
            end_layer: stop at the residual entering this layer (``L``: before the norm).
            every_layer: snapshot the residual entering every layer from the start on;
                otherwise only the end.
        """
        starts = [member.start for member in members]
        facts = starts[0].facts(split)
        stage0 = starts[0].stage
        if any(s.stage != stage0 or s.facts(split) != facts for s in starts):
            raise ValueError("a batch needs equal start stages and start facts")
        values, first = _batch_values(starts)
        for member in members:
            member.start.values = None  # type: ignore[assignment]  # consumed: memory
            member.snapshots = []

        def snap(layer: int) -> None:
            for r, member in enumerate(members):
                member.snapshots.append(_snapshot(values[:, r], member, layer))

        # The last layer's output is read at the kept positions only: attention queries and
        # MLP positions elsewhere are skipped there (earlier layers feed every position).
        single = all(start.single_position for start in starts)
        kept = sorted({p for member in members for p in member.positions.tolist()})
        last_queries = kept if len(kept) < values.shape[2] else None
        if every_layer and stage0 % 2 == 0:
            snap(stage0 // 2)
        # Parallel layers: the MLP reads what entered the layer, not what attention left.
        parallel = self.family.parallel
        entering = _entering(values, starts[0]) if parallel and stage0 % 2 else None
        for stage in range(stage0, 2 * end_layer):
            self.check()
            layer = stage // 2
            weights = self.weights(layer)
            values = values.to(weights.device)
            queries = last_queries if layer == end_layer - 1 else None
            if parallel and stage % 2 == 0:
                entering = values.clone()
            if stage == stage0 and stage % 2 == 0 and single and queries is None:
                self._attention_from_single_positions(weights, values, first)
            elif stage % 2 == 0:
                self._attention(weights, values, first, queries)
            else:
                source = None if entering is None else entering.to(weights.device)
                self._mlp(weights, values, first, facts, split, queries, layer, source)
                entering = None
                if every_layer:
                    snap(layer + 1)
        if not members[0].snapshots or members[0].snapshots[-1].layer != end_layer:
            snap(end_layer)
        self._weights.clear()

    def check(self) -> None:
        """Raise :class:`Cancelled` when the caller asks to stop (between units of work)."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("the attribution was cancelled")

    def _row_bytes(
        self, w: LayerWeights, members: int, length: int, hidden: int, element: int
    ) -> int:
        return attention_row_bytes(
            hidden,
            w.attention.value_width,
            w.attention.context_width,
            members,
            length,
            element,
            self.family.attention_temporaries,
        )

    def _attention(
        self,
        w: LayerWeights,
        values: torch.Tensor,
        first: list[int],
        queries: list[int] | None = None,
    ) -> None:
        """Add each component's attention output, in blocks of rows (in place); with
        ``queries``, at those positions only."""
        rows, members, length, hidden = values.shape
        per_row = self._row_bytes(w, members, length, hidden, values.element_size())
        probs_bytes = w.probs.numel() * w.probs.element_size()  # one copy of a block's
        block = attention_block(per_row, probs_bytes, self.budget_bytes, length)
        self._attend_rows(w, values, 0, 1, 0, queries)  # the remainder
        for lo in range(1, rows, block):
            p0 = first[lo - 1]
            if p0 < length:  # rows that are padding in every member stay zero
                self._attend_rows(w, values, lo, min(rows, lo + block), p0, queries)
        values[0] += w.attn_bias

    def _attention_from_single_positions(
        self, w: LayerWeights, values: torch.Tensor, first: list[int]
    ) -> None:
        """:meth:`_attention` for components non-zero at their first position ``p_m`` only.

        Component ``m``'s output at ``n`` is ``sum_h A[h, n, p_m] (W_O,h W_V,h x_m)``: each
        component is projected once, at ``p_m``, into one vector per head, which its
        column of the attention probabilities spreads over the positions. The same sum as
        the general path, for O(M D^2) instead of O(M N D^2) multiply-adds.
        """
        rows, members, length, hidden = values.shape
        per_row = self._row_bytes(w, members, length, hidden, values.element_size())
        block = attention_block(per_row, 0, self.budget_bytes, length)
        self._attend_rows(w, values, 0, 1, 0, None)  # the remainder: any shape
        for lo in range(1, rows, block):
            hi = min(rows, lo + block)
            where = first[lo - 1 : hi - 1]
            if where[0] >= length:  # rows that are padding in every member stay zero
                continue
            rows_index = torch.arange(lo, hi, device=values.device)
            at = torch.tensor(where, device=values.device).clamp_(max=length - 1)
            scale = w.attn_norm.scale
            x = w.attn_norm(
                values[rows_index, :, at], None if scale is None else scale[:, at].transpose(0, 1)
            )  # (B, R, D)
            u = w.attention.head_vectors(x, at)  # (B, R, H, D) per-head outputs
            spread = w.probs[:, :, :, at].permute(3, 0, 2, 1)  # (B, R, N, H): A[h, n, p_m]
            out = torch.matmul(spread, u).to(self.dtype)  # (B, R, N, D)
            values[lo:hi] += w.attn_post(out, w.attn_post.scale)
        values[0] += w.attn_bias

    def _attend_rows(
        self,
        w: LayerWeights,
        values: torch.Tensor,
        lo: int,
        hi: int,
        p0: int,
        queries: list[int] | None,
    ) -> None:
        rows = values[lo:hi, :, p0:]  # (B, R, N', D) view, zero before p0
        if queries is None:
            rows += w.attend(rows, p0)
            return
        normed = w.attn_norm(rows, w.attn_norm.at(slice(None), slice(p0, None)))
        index = torch.tensor([q for q in queries if q >= p0], device=values.device)
        if not index.numel():
            return
        probs = w.probs[:, :, index, p0:]  # (R, H, Q, N')
        # Few queries: mix, then project (fewer multiply-adds while H Q < H_kv d_h, and a
        # mixed tensor within the block's estimate while H Q <= 2 N').
        mixes = w.attention.shape.heads * index.numel()
        if mixes <= min(w.attention.value_width, 2 * normed.shape[2]):
            context = w.attention.query_context(normed, probs, p0)
        else:
            context = w.attention.head_context(normed, probs=probs)
        out = w.attention.output(context, self.dtype)
        values[lo:hi, :, index] += w.attn_post(out, w.attn_post.at(slice(None), index))

    def _mlp(
        self,
        w: LayerWeights,
        values: torch.Tensor,
        first: list[int],
        facts: StartFacts,
        split: SplitSettings,
        queries: list[int] | None = None,
        layer: int = -1,
        source: torch.Tensor | None = None,
    ) -> None:
        """Add each component's share of the MLP output, in chunks of positions (in place);
        with ``queries``, at those positions only. ``source``: the components the MLP reads
        (a parallel layer's input; default ``values``)."""
        source = values if source is None else source
        rows, members, length, hidden = values.shape
        per_position = mlp_position_bytes(
            hidden,
            w.split_width,
            rows,
            members,
            values.element_size(),
            w.matmul_dtype != values.dtype,
            self.family.mlp_temporaries,
        )
        late_starts = bool(first) and first[-1] > 0  # smaller chunks skip more zeros
        chunk = mlp_chunk(per_position, self.budget_bytes, length, late_starts)
        spec = SplitSpec(
            rule=split.rule,
            temperature=split.temperature,
            anchor=facts.anchor,
            first_token_rule=facts.first_token_rule,
            starts_at_zero=True,
        )
        for where, p0, p1 in _position_chunks(length, chunk, queries, values.device):
            self.check()
            live = 1 + bisect.bisect_left(first, p1)  # the remainder and the rows alive
            block = source[:live, :, where]  # (live, R, P, D): a view, or a copy with queries
            chunk_spec = replace(
                spec,
                anchor=spec.anchor if spec.anchor is not None and spec.anchor < live else None,
                floored=tuple(i for i in facts.floored if i < live),
            )
            output = self.mlp_output(w, block, where, p0 == 0, chunk_spec, layer)
            if output is None:
                continue
            if isinstance(where, slice) and source is values:
                block += output
            else:
                values[:live, :, where] += output
        if w.mlp_bias is not None:
            values[0] += w.mlp_bias

    def mlp_output(
        self,
        w: LayerWeights,
        block: torch.Tensor,
        where: slice | torch.Tensor,
        at_zero: bool,
        spec: SplitSpec,
        layer: int = -1,
        biased: bool = True,
    ) -> torch.Tensor | None:
        """Each component's share of the MLP block's output at a chunk of positions.

        Args:
            block: (live, R, P, D) the components the MLP reads at positions ``where``
                (row 0 the remainder, which takes the pre-activation biases).
            at_zero: the chunk starts at position 0.
            spec: the split of this chunk (anchor and floored rows among ``live``).
            biased: add the pre-activation biases to row 0 (``False``: every row is a
                component without them; the reverse pass adds them apart).

        Returns:
            (live, R, P, D) through the frozen post-norm (the output bias apart), or
            ``None`` when no run of neurons ran there.
        """
        scale = w.mlp_norm.scale
        scale = None if scale is None else scale[:, where] * spec.gate_scale
        normed = w.mlp_norm(block, scale)
        if scale is None and spec.gate_scale != 1.0:  # no pre-norm to fold 1 / T into
            normed = normed * spec.gate_scale
        present = normed.ne(0).any(-1)  # (live, R, P): eligibility, from the vectors
        present[0] = True  # the remainder: by its gates (it is floored)
        output = None
        for neurons in w.neurons.blocks:
            if len(w.neurons.blocks) > 1:  # a mixture's experts: each a unit of work
                self.check()
            part = self._neuron_block_output(
                w, neurons, normed, present, where, at_zero, spec, layer, biased
            )
            if part is not None:
                output = part if output is None else output.add_(part)
        if output is None or w.mlp_post.identity:
            return output
        return w.mlp_post(output, w.mlp_post.at(slice(None), where))

    def _neuron_block_output(
        self,
        w: LayerWeights,
        neurons: FrozenNeuronBlock,
        normed: torch.Tensor,
        present: torch.Tensor,
        where: slice | torch.Tensor,
        at_zero: bool,
        spec: SplitSpec,
        layer: int,
        biased: bool = True,
    ) -> torch.Tensor | None:
        """The components' share (live, R, P, D) of one run of neurons' output at a chunk
        of positions ``where`` (``at_zero``: the chunk starts at position 0), computed only
        at the positions where the run's expert was chosen; ``None`` if at none."""
        act = w.act[:, where, neurons.columns]  # (R, P, I_b)
        true_gate = w.gate[:, where, neurons.columns]
        positions = normed.shape[2]
        local = None  # the chunk's positions this run computes (None: all)
        if neurons.routed is not None:
            local = neurons.routed[:, where].any(0).nonzero().flatten()
            if not local.numel():
                return None
            normed, present = normed[:, :, local], present[:, :, local]
            act, true_gate = act[:, local], true_gate[:, local]
            at_zero = at_zero and int(local[0]) == 0
        gates = neurons.pre_activations(normed)  # (live, R, P', I_b) float32
        if neurons.remainder_bias is not None and biased:
            gates[0] += neurons.remainder_bias * spec.gate_scale
        if self.on_mlp is not None:
            self.on_mlp(layer, gates.sum(0) / spec.gate_scale, true_gate)
        spec = replace(spec, starts_at_zero=at_zero)
        shares = neuron_shares(gates, act, true_gate, present, spec, self.fused_split)
        output = neurons.output(shares, self.dtype)  # (live, R, P', D)
        if local is None:
            return output
        full = output.new_zeros(*output.shape[:2], positions, output.shape[-1])
        return full.index_add_(2, local, output)


def _position_chunks(
    length: int, chunk: int, queries: list[int] | None, device: torch.device
) -> Iterator[tuple[slice | torch.Tensor, int, int]]:
    """Chunks of at most ``chunk`` positions: ``(selector, first position, last + 1)``;
    slices of ``0..length`` or, with ``queries``, index tensors of those positions."""
    if queries is None:
        for p0 in range(0, length, chunk):
            yield slice(p0, min(length, p0 + chunk)), p0, min(length, p0 + chunk)
        return
    for i in range(0, len(queries), chunk):
        part = queries[i : i + chunk]
        yield torch.tensor(part, device=device), part[0], part[-1] + 1


def _entering(values: torch.Tensor, start: Start) -> torch.Tensor:
    """What entered the layer of a start at its MLP stage: the rows ``start.entering_rows``
    (a parallel layer's MLP reads them alone; the attention parts did not enter it)."""
    entering = torch.zeros_like(values)
    rows = list(start.entering_rows)
    entering[rows] = values[rows]
    return entering


def _batch_values(starts: Sequence[Start]) -> tuple[torch.Tensor, list[int]]:
    """The (M + 1, R, N, D) components of a batch (padded with zero rows and positions),
    and each row's first position over the batch (the earliest of the members)."""
    if len(starts) == 1:
        return starts[0].values[:, None], list(starts[0].first_position)
    rows = max(s.values.shape[0] for s in starts)
    length = max(s.values.shape[1] for s in starts)
    first = [length] * (rows - 1)
    values = starts[0].values.new_zeros(rows, len(starts), length, starts[0].values.shape[2])
    for r, start in enumerate(starts):
        m, n = start.values.shape[:2]
        values[:m, r, :n] = start.values
        first[: m - 1] = [min(a, b) for a, b in zip(first, start.first_position, strict=False)]
    return values, first


def _snapshot(values: torch.Tensor, member: Member, layer: int) -> Snapshot:
    """One member's snapshot from its (M + 1, N, D) slice of the batch."""
    output_rows = member.start.output_rows
    own = values[: len(output_rows) + 1, : member.length]
    if member.positions.tolist() != list(range(member.length)):
        own = own.index_select(1, member.positions.to(values.device))
    if output_rows == list(range(1, len(output_rows) + 1)):
        kept = own.clone()  # already in order (a copy: propagation goes on in ``values``)
    else:
        rows = torch.tensor([0, *output_rows], device=values.device)
        kept = own.index_select(0, rows)
    # ``kept`` holds every row (the remainder too): its sum is the total at those positions
    return Snapshot(layer=layer, values=kept, total=kept.sum(0))
