"""The granularities: one object each (:class:`Granularity`, :data:`GRANULARITY_KINDS`)
saying which request fields it owns, its layer range, how many components it makes, and
how it starts; and the start builders they call, with the components' labels.

Every builder returns a :class:`Start`: the (M + 1, N, D) components in the propagation
layout (row 0 is the remainder, which holds bias terms and whatever the given parts leave
of the true state; the components follow, sorted by the first position where each may be
non-zero), the row of each component in the caller's order, which row holds the first
token, the stage where propagation begins, and one readable label per component. Each
builder writes into one preallocated tensor, so a start costs its own size once. Layer
``s`` conventions:

========  =====================================================  ====================
token     ``h^s`` split by position (or by groups of positions)   from attention of s
subspace  user components of ``h^s`` (+ remainder to ``h^s``)     from attention of s
module    ``[h^s, attn_s]`` or ``[u^s, mlp_s]``                   MLP of s / layer s+1
head      ``[h^s, head_1 .. head_H]`` (value/output bias: rem.)   from MLP of s
neuron    ``[u^s + other neurons, neuron_i ..]``                  from layer s + 1
========  =====================================================  ====================

Two names not to confuse: the **remainder** is what belongs to no component (biases,
and a subspace's rest); it is row 0 everywhere inside the engine (starts, propagation,
snapshots, views) and the result's ``remainder`` fields. ``rest`` is a component, the
first of module, head and neuron runs: what entered the layer (``h^s``, ``u^s``, plus
the neurons not asked for). The **first-token rule** (the request's ``ignore_bos``; on
by default for token runs, :attr:`Granularity.first_token_rule`) is ``first_token_rule``
in every internal setting (``SplitSettings``, ``StartFacts``, ``SplitSpec``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from engine.errors import RequestError
from engine.propagate import LayerWeights, Start, attention_stage, mlp_stage
from engine.reverse import batched_vjp

if TYPE_CHECKING:
    from engine.capture import ForwardTrace
    from engine.reverse import StageGradients
    from engine.view import ModelView

SUBSPACE_ROUNDING = 1e-5


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def token_start(
    resid: torch.Tensor,
    layer: int,
    token_texts: Sequence[str],
    groups: Sequence[Sequence[int]] | None,
    span_text: Callable[[Sequence[int]], str] | None = None,
) -> Start:
    """Token components of the residual entering ``layer`` (``resid`` (N, D)).

    Without groups, component ``k`` is position ``k``. With groups, each group is one
    component, and positions in no group form a final ``ungrouped`` component; a group
    is labelled by the decoded text of its positions' tokens (``span_text``: positions ->
    text; default: the token texts joined).
    """
    length = resid.shape[0]
    if groups is None:
        values = resid.new_zeros(length + 1, length, resid.shape[1])
        positions = torch.arange(length, device=resid.device)
        values[positions + 1, positions] = resid
        return Start(
            values=values,
            first_position=list(range(length)),
            output_rows=list(range(1, length + 1)),
            anchor=1,
            stage=attention_stage(layer),
            labels=[f"tok[{k}]:{_quote(token_texts[k])}" for k in range(length)],
            single_position=True,
        )
    first_alone = [0] in groups  # the first-token rule needs a group of the first token alone
    groups, labels = token_components(length, token_texts, groups, span_text)
    order = sorted(range(len(groups)), key=lambda j: groups[j][0])  # rows by first position
    output_rows = [0] * len(groups)
    values = resid.new_zeros(len(groups) + 1, length, resid.shape[1])
    for row, j in enumerate(order, start=1):
        output_rows[j] = row
        values[row, groups[j]] = resid[groups[j]]
    return Start(
        values=values,
        first_position=[groups[j][0] for j in order],
        output_rows=output_rows,
        anchor=output_rows[next(j for j, g in enumerate(groups) if 0 in g)],
        first_token_alone=first_alone,
        stage=attention_stage(layer),
        labels=labels,
    )


def token_components(
    length: int,
    token_texts: Sequence[str],
    groups: Sequence[Sequence[int]] | None,
    span_text: Callable[[Sequence[int]], str] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """The positions of each token component and its label: one per position without
    groups; else each group (labelled by the decoded text of its tokens, ``span_text``:
    positions -> text, default the token texts joined), then the positions in none
    (``ungrouped``)."""
    if groups is None:
        return [[k] for k in range(length)], [
            f"tok[{k}]:{_quote(token_texts[k])}" for k in range(length)
        ]
    span = span_text or (lambda positions: "".join(token_texts[p] for p in positions))
    out = [sorted(g) for g in groups]
    labels = [_group_label(g, span) for g in out]
    covered = {p for g in out for p in g}
    rest = [p for p in range(length) if p not in covered]
    if rest:
        out.append(rest)
        labels.append("ungrouped")
    return out, labels


def _group_label(group: list[int], span_text: Callable[[Sequence[int]], str]) -> str:
    """``tok[1:4]:"When Mary and"``: the span, and the text of each run of consecutive
    positions (runs joined by an ellipsis)."""
    runs: list[list[int]] = []
    for p in group:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    text = "…".join(span_text(run) for run in runs)
    if len(runs) == 1:
        span = f"{group[0]}" if len(group) == 1 else f"{group[0]}:{group[-1] + 1}"
    else:
        span = ",".join(str(p) for p in group)
    return f"tok[{span}]:{_quote(text)}"


def _from_position_zero(
    values: torch.Tensor, stage: int, labels: list[str], entering_rows: tuple[int, ...] = ()
) -> Start:
    """A start whose components all may be non-zero from position 0, in the caller's order
    (row ``1 + j`` is component ``j``; row 1 holds the first token).

    The last component's gates are floored like the remainder's: the reference takes the
    last component of its layout for its remainder in every granularity (the module
    output, the last head, the last neuron, the last subspace part).
    """
    count = values.shape[0] - 1
    return Start(
        values=values,
        first_position=[0] * count,
        output_rows=list(range(1, count + 1)),
        anchor=1,
        stage=stage,
        labels=labels,
        floored=(count,),
        entering_rows=entering_rows,
    )


def subspace_start(resid: torch.Tensor, layer: int, parts: torch.Tensor) -> Start:
    """User components ``parts`` (K, N, D) of ``resid``; the remainder makes up the rest.

    Differences below ``SUBSPACE_ROUNDING`` times the largest entry of ``resid`` at that
    position are rounding (parts computed by another forward pass, or summed in another
    order), not a component: they are zeroed, and show in the conservation error. A
    noise remainder would otherwise win MLP shares under the eligibility rules.
    """
    count = parts.shape[0]
    values = resid.new_empty(count + 1, *resid.shape)
    values[1:] = parts
    remainder = torch.sub(resid, parts.sum(0), out=values[0])  # (N, D)
    rounding = SUBSPACE_ROUNDING * resid.abs().amax(-1, keepdim=True)
    remainder.masked_fill_(remainder.abs() <= rounding, 0.0)
    labels = [f"subspace[{k}]" for k in range(count)]
    return _from_position_zero(values, attention_stage(layer), labels)


def module_start(
    resid_pre: torch.Tensor,
    resid_mid: torch.Tensor,
    resid_post: torch.Tensor,
    layer: int,
    module: str,
) -> Start:
    """``[h^s, attn output]`` (continues at the MLP of s) or ``[u^s, MLP output]``."""
    if module == "attn":
        parts, stage = [resid_pre, resid_mid - resid_pre], mlp_stage(layer)
    else:
        parts, stage = [resid_mid, resid_post - resid_mid], attention_stage(layer + 1)
    values = torch.stack([torch.zeros_like(resid_pre), *parts])
    return _from_position_zero(values, stage, ["rest", f"L{layer}.{module}"], (1,))


def head_start(
    resid_pre: torch.Tensor, weights: LayerWeights, layer: int, member: int = 0
) -> Start:
    """``[h^s, head_1 .. head_H]``; value and output biases start in the remainder.

    ``member``: the prompt's index in the batch ``weights`` was built for.
    """
    heads = weights.head_outputs(resid_pre, member)  # (H, N, D)
    bias = weights.bias_of(weights.attn_bias, member, resid_pre)
    values = torch.cat([bias[None], resid_pre[None], heads])
    return _from_position_zero(values, mlp_stage(layer), head_labels(layer, heads.shape[0]), (1,))


def head_labels(layer: int | None, heads: int) -> list[str]:
    """``["rest", "L3.H0", ..]`` for the heads of one layer; without a layer (a result
    over several layers, whose layer axis names it) ``["rest", "H0", ..]``."""
    prefix = "" if layer is None else f"L{layer}."
    return ["rest"] + [f"{prefix}H{h}" for h in range(heads)]


def neuron_start(
    resid_mid: torch.Tensor,
    weights: LayerWeights,
    layer: int,
    neurons: Sequence[int] | None,
    member: int = 0,
) -> Start:
    """``[rest, neuron_i ..]`` after the MLP of ``layer``.

    Neuron ``i`` contributes ``a[:, i] * W_down[:, i]``; ``rest`` is the residual after
    attention plus the neurons not asked for, so the components add up to ``h^(s+1)``
    (the down-projection bias, if any, starts in the remainder). ``member``: the prompt's
    index in the batch ``weights`` was built for.
    """
    length = resid_mid.shape[0]
    chosen = list(range(weights.neurons.width)) if neurons is None else list(neurons)
    index = torch.tensor(chosen, dtype=torch.long, device=weights.device)
    act = weights.act[member, :length]  # (N, I)
    values = resid_mid.new_empty(len(chosen) + 2, *resid_mid.shape)
    values[0] = weights.bias_of(weights.mlp_bias, member, resid_mid)
    directions = weights.neurons.directions(index, resid_mid.dtype)  # (K, D)
    torch.mul(act[:, index].T[:, :, None], directions[:, None, :], out=values[2:])  # (K, N, D)
    if not weights.mlp_post.identity:  # each neuron's output through the frozen post-norm
        post = weights.mlp_post
        values[2:] = post(values[2:], post.at(member, slice(None, length)))
    others = weights.neuron_outputs(act.index_fill(1, index, 0.0), member)
    torch.add(resid_mid, others, out=values[1])
    labels = ["rest"] + [f"L{layer}.{weights.neuron_name(i)}" for i in chosen]
    return _from_position_zero(values, attention_stage(layer + 1), labels)


# ---------------------------------------------------------------------------- granularities

#: Token groups as the engine checked them (positions normalised), or none.
Groups = list[list[int]] | None


class RequestFields(Protocol):
    """The request fields a granularity reads: an :class:`engine.request.AttributionRequest`
    (or, for :meth:`Granularity.smaller`, the HTTP body, which has the same fields)."""

    @property
    def module(self) -> str | None: ...

    @property
    def neurons(self) -> list[int] | None: ...

    @property
    def subspace(self) -> Any: ...

    @property
    def groups(self) -> Any: ...

    @property
    def start_layers(self) -> list[int]: ...


@dataclass(frozen=True)
class Granularity:
    """One value of ``AttributionRequest.granularity``: what its components are, which
    request fields belong to it, which layers it may start at, how many components it
    makes, what its start holds beside them, and how it starts.

    Attributes:
        name: the request's value.
        of_residual: the components split the residual entering the start layer ``s``
            (``s`` in ``0..L``, the first snapshot may be ``s``) rather than the parts of
            layer ``s`` (``s`` in ``0..L-1``, the first snapshot is ``s + 1``).
        fields: the request fields only this granularity may set.
        required: those of :attr:`fields` it needs.
        several_layers: ``start_layer`` may list several layers (one run each).
        first_token_rule: the first-token rule's default (``ignore_bos=None``).
    """

    name: str
    of_residual: bool = False
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    several_layers: bool = False
    first_token_rule: bool = False

    def start_layers(self, num_layers: int) -> range:
        """The start layers a model of ``num_layers`` layers allows."""
        return range(num_layers + 1 if self.of_residual else num_layers)

    def lowest_end(self, layer: int) -> int:
        """The smallest end layer of a run starting at ``layer``."""
        return layer if self.of_residual else layer + 1

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        """Components of one run (the remainder apart), checking the fields against the
        model (:class:`RequestError` names the field)."""
        raise NotImplementedError

    def late_starts(self, count: int) -> bool:
        """Components start at different positions (what caps the MLP chunks)."""
        return False

    def start_bytes(self, model: ModelView, count: int, length: int) -> int:
        """Bytes the start builder holds beside the components."""
        return 0

    def start(self, run: RunStart) -> Start:
        """The initial components of ``run``."""
        raise NotImplementedError

    def start_stage(self, layer: int, request: RequestFields) -> int:
        """The stage a run starting at ``layer`` propagates from."""
        return attention_stage(layer)

    def batch_key(self, request: RequestFields) -> tuple[Any, ...]:
        """The values of this granularity's fields that runs sharing a batch must agree
        on (beyond the start facts, compared once the starts are built)."""
        return ()

    def reverse_scores(self, run: RunStart, grads: StageGradients) -> ReverseRun:
        """Every component's score from the gradients of one reverse pass: each start
        component times the gradient at the stage it starts at."""
        start = self.start(run)
        scores = grads.scores_of(start.values, start.stage, start.entering_rows)
        return ReverseRun(
            scores=scores[[0, *start.output_rows]],
            labels=start.labels,
            first_positions=[start.first_position[row - 1] for row in start.output_rows],
            stage=start.stage,
        )

    def smaller(self, request: Any) -> str | None:
        """How to ask for fewer components of this granularity, if there is a way
        (``request``: an :class:`AttributionRequest` or the HTTP body, same fields)."""
        return None


@dataclass
class ReverseRun:
    """One run's components scored by a reverse pass: ``scores`` (M + 1, K) with the
    remainder's start row first, then the components in the labels' order, for the
    ``K`` scored (position, target) logits; ``stage``: where the run starts."""

    scores: torch.Tensor
    labels: list[str]
    first_positions: list[int]
    stage: int


@dataclass(frozen=True)
class RunStart:
    """What starting one run takes: the model's view, the request, its prompt's trace,
    the start layer and the request's checked token groups."""

    model: ModelView
    request: RequestFields
    trace: ForwardTrace
    layer: int
    groups: Groups

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the compute dtype."""
        return self.model.cast(tensor)

    def layer_weights(self) -> LayerWeights:
        """The start layer's weights and frozen quantities, for this prompt alone."""
        return self.model.layer_weights(self.trace, self.layer)


@dataclass(frozen=True)
class TokenGranularity(Granularity):
    """Input tokens (or groups of them): the residual entering ``s`` split by position."""

    name: str = "token"
    of_residual: bool = True
    fields: tuple[str, ...] = ("groups", "all_layers")
    first_token_rule: bool = True

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        if groups is None:
            return length
        covered = sum(len(g) for g in groups)
        return len(groups) + (covered < length)

    def late_starts(self, count: int) -> bool:
        return count > 1

    @staticmethod
    def _texts(run: RunStart) -> tuple[list[str], Callable[[Sequence[int]], str]]:
        """Each token's text, and the decoded text of a span of positions."""
        ids = run.trace.input_ids.tolist()
        span = lambda positions: run.model.span_text([ids[p] for p in positions])  # noqa: E731
        return run.model.token_texts(ids), span

    def start(self, run: RunStart) -> Start:
        texts, span = self._texts(run)
        resid = run.cast(run.trace.resid(run.layer))
        return token_start(resid, run.layer, texts, run.groups, span)

    def reverse_scores(self, run: RunStart, grads: StageGradients) -> ReverseRun:
        # Component k is h^s at its positions: its score is h^s[n] . grad[n] summed there.
        stage = attention_stage(run.layer)
        grad = grads.entering(stage)  # (K, N, D)
        resid = run.cast(run.trace.resid(run.layer)).to(grad.device, grad.dtype)
        per_position = torch.einsum("nd,knd->nk", resid, grad)  # (N, K)
        texts, span = self._texts(run)
        parts, labels = token_components(resid.shape[0], texts, run.groups, span)
        if run.groups is None:
            scores = per_position
        else:
            scores = torch.stack([per_position[part].sum(0) for part in parts])
        remainder = scores.new_zeros(1, scores.shape[1])
        return ReverseRun(
            scores=torch.cat([remainder, scores]),
            labels=labels,
            first_positions=[part[0] for part in parts],
            stage=stage,
        )

    def smaller(self, request: Any) -> str | None:
        return "token groups" if request.groups is None else None


@dataclass(frozen=True)
class SubspaceGranularity(Granularity):
    """User-given parts (K, N, D) of the residual entering ``s``."""

    name: str = "subspace"
    of_residual: bool = True
    fields: tuple[str, ...] = ("subspace",)
    required: tuple[str, ...] = ("subspace",)

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        shape = tuple(np.shape(request.subspace))
        if shape[1:] != (length, model.info.hidden_size):
            raise RequestError(
                "subspace", f"shape {shape} must be (K, {length}, {model.info.hidden_size})"
            )
        return int(shape[0])

    def start_bytes(self, model: ModelView, count: int, length: int) -> int:
        # the parts, as a tensor
        return count * length * model.info.hidden_size * model.shape.compute_bytes

    def start(self, run: RunStart) -> Start:
        resid = run.cast(run.trace.resid(run.layer))
        parts = torch.as_tensor(run.request.subspace, dtype=resid.dtype)
        return subspace_start(resid, run.layer, parts.to(resid.device))


@dataclass(frozen=True)
class ModuleGranularity(Granularity):
    """Layer ``s``'s attention or MLP output beside what entered it."""

    name: str = "module"
    fields: tuple[str, ...] = ("module",)
    required: tuple[str, ...] = ("module",)
    several_layers: bool = True

    def start_stage(self, layer: int, request: RequestFields) -> int:
        return (
            mlp_stage(layer) if (request.module or "attn") == "attn" else attention_stage(layer + 1)
        )

    def batch_key(self, request: RequestFields) -> tuple[Any, ...]:
        return (request.module,)  # attention or MLP: a different start stage

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        return 2

    def start(self, run: RunStart) -> Start:
        frozen = run.trace.layers[run.layer]
        return module_start(
            run.cast(frozen.resid_pre),
            run.cast(frozen.resid_mid),
            run.cast(run.trace.resid(run.layer + 1)),
            run.layer,
            run.request.module or "attn",
        )


@dataclass(frozen=True)
class HeadGranularity(Granularity):
    """Layer ``s``'s attention heads beside what entered the layer; several layers at once."""

    name: str = "head"
    several_layers: bool = True

    def start_stage(self, layer: int, request: RequestFields) -> int:
        return mlp_stage(layer)

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        return model.info.num_heads + 1

    def start_bytes(self, model: ModelView, count: int, length: int) -> int:
        # head outputs before placing
        return (count + 1) * length * model.info.hidden_size * model.shape.compute_bytes

    def start(self, run: RunStart) -> Start:
        weights = run.layer_weights()
        resid = run.cast(run.trace.layers[run.layer].resid_pre).to(weights.device)
        return head_start(resid, weights, run.layer)


@dataclass(frozen=True)
class NeuronGranularity(Granularity):
    """Layer ``s``'s MLP neurons (all, or those of ``neurons``) beside the rest."""

    name: str = "neuron"
    fields: tuple[str, ...] = ("neurons",)
    several_layers: bool = True

    def start_stage(self, layer: int, request: RequestFields) -> int:
        return attention_stage(layer + 1)

    def count(self, model: ModelView, request: RequestFields, length: int, groups: Groups) -> int:
        widths = [model.neuron_width(layer) for layer in request.start_layers]
        neurons = request.neurons
        if neurons is None:
            if len(set(widths)) > 1:
                raise RequestError(
                    "start_layer",
                    f"these layers have MLPs of different widths ({sorted(set(widths))}); "
                    "ask for all neurons of one width at a time, or name neurons",
                )
            return 1 + max(widths)
        if not neurons:
            raise RequestError("neurons", "must name at least one neuron (or be null for all)")
        if any(not 0 <= n < min(widths) for n in neurons):
            raise RequestError("neurons", f"neuron indices must lie in [0, {min(widths)})")
        if len(set(neurons)) != len(neurons):
            raise RequestError("neurons", "repeats a neuron")
        return 1 + len(neurons)

    def start_bytes(self, model: ModelView, count: int, length: int) -> int:
        # picked columns, the rest
        d = model.info.hidden_size
        width = model.info.intermediate_size
        return (count * d + length * width + 2 * length * d) * model.shape.compute_bytes

    def start(self, run: RunStart) -> Start:
        weights = run.layer_weights()
        resid = run.cast(run.trace.layers[run.layer].resid_mid).to(weights.device)
        return neuron_start(resid, weights, run.layer, run.request.neurons)

    def reverse_scores(self, run: RunStart, grads: StageGradients) -> ReverseRun:
        # Neuron i adds a[n, i] W_down[:, i] (through the post-norm): its score is its
        # activation times the gradient at the down-projection input, summed over n.
        # Nothing of (neurons, N, D) size is built, so every neuron of a layer is cheap.
        stage = attention_stage(run.layer + 1)
        grad = grads.at_stage[stage]  # (K, N, D)
        weights = run.layer_weights()
        length = grad.shape[1]
        act = weights.act[0, :length].to(grad.device, grad.dtype)  # (N, W)
        with torch.enable_grad():
            probe = act.detach().clone().requires_grad_(True)
            out = weights.neuron_outputs(probe)  # (N, D), linear in the activations
            (at_input,) = batched_vjp(out, [probe], grad)  # (K, N, W)
        every = torch.einsum("ni,kni->ik", act, at_input)  # (W, K)
        chosen = list(range(every.shape[0])) if run.request.neurons is None else run.request.neurons
        resid = run.cast(run.trace.layers[run.layer].resid_mid).to(grad.device, grad.dtype)
        rest = torch.einsum("nd,knd->k", resid, grad) + every.sum(0) - every[chosen].sum(0)
        bias = weights.bias_of(weights.mlp_bias, 0, resid).to(grad.dtype)
        remainder = torch.einsum("nd,knd->k", bias, grad)
        labels = ["rest"] + [f"L{run.layer}.{weights.neuron_name(i)}" for i in chosen]
        return ReverseRun(
            scores=torch.cat([remainder[None], rest[None], every[chosen]]),
            labels=labels,
            first_positions=[0] * len(labels),
            stage=stage,
        )

    def smaller(self, request: Any) -> str | None:
        return "fewer neurons"


#: Every granularity, by its request value (the order of ``engine.request.Granularity``).
GRANULARITY_KINDS: dict[str, Granularity] = {
    kind.name: kind
    for kind in (
        TokenGranularity(),
        ModuleGranularity(),
        HeadGranularity(),
        NeuronGranularity(),
        SubspaceGranularity(),
    )
}
