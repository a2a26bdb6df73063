"""Initial components for each granularity, and their labels.

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
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from engine.propagate import LayerWeights, Start, attention_stage, mlp_stage

SUBSPACE_ROUNDING = 1e-5


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def token_start(
    resid: torch.Tensor,
    layer: int,
    token_texts: Sequence[str],
    groups: Sequence[Sequence[int]] | None,
) -> Start:
    """Token components of the residual entering ``layer`` (``resid`` (N, D)).

    Without groups, component ``k`` is position ``k``. With groups, each group is one
    component, and positions in no group form a final ``ungrouped`` component.
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
    groups = [sorted(g) for g in groups]
    labels = [_group_label(g, token_texts) for g in groups]
    first_alone = [0] in groups  # the first-token rule needs a group of the first token alone
    covered = {p for g in groups for p in g}
    rest = [p for p in range(length) if p not in covered]
    if rest:
        groups.append(rest)
        labels.append("ungrouped")
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
        anchor_alone=first_alone,
        stage=attention_stage(layer),
        labels=labels,
    )


def _group_label(group: list[int], token_texts: Sequence[str]) -> str:
    text = "".join(token_texts[p] for p in group)
    if group == list(range(group[0], group[-1] + 1)):
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
    chosen = list(range(weights.w_down.shape[1])) if neurons is None else list(neurons)
    index = torch.tensor(chosen, dtype=torch.long, device=weights.device)
    act = weights.act[member, :length]  # (N, I)
    values = resid_mid.new_empty(len(chosen) + 2, *resid_mid.shape)
    values[0] = weights.bias_of(weights.mlp_bias, member, resid_mid)
    w_down = weights.w_down[:, index].to(resid_mid.dtype)  # (D, K)
    torch.mul(act[:, index].T[:, :, None], w_down.T[:, None, :], out=values[2:])  # (K, N, D)
    if not weights.mlp_post.identity:  # each neuron's output through the frozen post-norm
        post = weights.mlp_post
        values[2:] = post(values[2:], post.at(member, slice(None, length)))
    others = weights.neuron_outputs(act.index_fill(1, index, 0.0), member)
    torch.add(resid_mid, others, out=values[1])
    labels = ["rest"] + [f"L{layer}.{weights.neuron_name(i)}" for i in chosen]
    return _from_position_zero(values, attention_stage(layer + 1), labels)
