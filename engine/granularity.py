"""Initial components for each granularity, and their labels.

Every builder returns a :class:`Start`: the (M + 1, N, D) components (the last row is the
remainder, which holds bias terms and whatever the given parts leave of the true state),
where each may first be non-zero, which one holds the first token, the stage where
propagation begins, and one readable label per component. Layer ``s`` conventions:

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
    first_alone = True
    if groups is None:
        groups = [[k] for k in range(length)]
        labels = [f"tok[{k}]:{_quote(token_texts[k])}" for k in range(length)]
    else:
        groups = [sorted(g) for g in groups]
        labels = [_group_label(g, token_texts) for g in groups]
        first_alone = [0] in groups  # the first-token rule needs a group of the first token alone
        covered = {p for g in groups for p in g}
        rest = [p for p in range(length) if p not in covered]
        if rest:
            groups.append(rest)
            labels.append("ungrouped")
    values = resid.new_zeros(len(groups) + 1, length, resid.shape[1])
    for index, group in enumerate(groups):
        values[index, group] = resid[group]
    holder = next(i for i, g in enumerate(groups) if 0 in g)
    return Start(
        values=values,
        first_position=torch.tensor([g[0] for g in groups], dtype=torch.long),
        anchor=holder,
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


def subspace_start(resid: torch.Tensor, layer: int, parts: torch.Tensor) -> Start:
    """User components ``parts`` (K, N, D) of ``resid``; the remainder makes up the rest.

    Differences below ``SUBSPACE_ROUNDING`` times the largest entry of ``resid`` at that
    position are rounding (parts computed by another forward pass, or summed in another
    order), not a component: they are zeroed, and show in the conservation error. A
    noise remainder would otherwise win MLP shares under the eligibility rules.
    """
    remainder = resid - parts.sum(0)  # (N, D)
    rounding = SUBSPACE_ROUNDING * resid.abs().amax(-1, keepdim=True)
    remainder = torch.where(remainder.abs() <= rounding, torch.zeros_like(remainder), remainder)
    return Start(
        values=torch.cat([parts, remainder[None]]),
        first_position=torch.zeros(parts.shape[0], dtype=torch.long),
        anchor=0,
        stage=attention_stage(layer),
        labels=[f"subspace[{k}]" for k in range(parts.shape[0])],
        floored=(parts.shape[0] - 1,),  # as the reference, which has no remainder there
    )


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
    return Start(
        values=torch.stack([*parts, torch.zeros_like(resid_pre)]),
        first_position=torch.zeros(2, dtype=torch.long),
        anchor=0,
        stage=stage,
        labels=["rest", f"L{layer}.{module}"],
    )


def head_start(resid_pre: torch.Tensor, weights: LayerWeights, layer: int) -> Start:
    """``[h^s, head_1 .. head_H]``; value and output biases start in the remainder."""
    heads = weights.head_outputs(resid_pre * weights.in_scale)  # (H, N, D)
    remainder = weights.attn_bias.expand_as(resid_pre)
    return Start(
        values=torch.cat([resid_pre[None], heads, remainder[None]]),
        first_position=torch.zeros(heads.shape[0] + 1, dtype=torch.long),
        anchor=0,
        stage=mlp_stage(layer),
        labels=["rest"] + [f"L{layer}.H{h}" for h in range(heads.shape[0])],
    )


def neuron_start(
    resid_mid: torch.Tensor,
    weights: LayerWeights,
    layer: int,
    neurons: Sequence[int] | None,
) -> Start:
    """``[rest, neuron_i ..]`` after the MLP of ``layer``.

    Neuron ``i`` contributes ``a[:, i] * W_down[:, i]``; ``rest`` is the residual after
    attention plus the neurons not asked for, so the components add up to ``h^(s+1)``
    (the down-projection bias, if any, starts in the remainder).
    """
    chosen = list(range(weights.w_down.shape[1])) if neurons is None else list(neurons)
    index = torch.tensor(chosen, dtype=torch.long, device=weights.device)
    act = weights.act  # (N, I)
    picked = act[:, index].T[:, :, None] * weights.w_down[:, index].T[:, None, :]  # (K, N, D)
    others = act.index_fill(1, index, 0.0) @ weights.w_down.T  # (N, D)
    remainder = (
        torch.zeros_like(resid_mid)
        if weights.mlp_bias is None
        else weights.mlp_bias.expand_as(resid_mid).clone()
    )
    return Start(
        values=torch.cat([(resid_mid + others)[None], picked, remainder[None]]),
        first_position=torch.zeros(len(chosen) + 1, dtype=torch.long),
        anchor=0,
        stage=attention_stage(layer + 1),
        labels=["rest"] + [f"L{layer}.N{i}" for i in chosen],
    )
