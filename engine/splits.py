"""MLP split rules: how one neuron's output is shared among the components.

For a gated MLP ``down(act(g) * up)`` the true activation ``a[n, i]`` of neuron ``i`` at
position ``n`` is frozen. Each component ``m`` has its own gate pre-activation
``g_m = W_gate c_hat_m`` (its normalised part of the input), and a rule turns the
``g_m`` into coefficients ``alpha_m`` that sum to one over the components, so that
``sum_m alpha_m * a = a`` (conservation). The rules follow the method page
(``docs/method.md``); where the public reference loses part of the neuron, the engine
uses the conserving definition:

- ``softmax``: ``exp(g_m / T)`` over the eligible components.
- ``relu``: ``relu(g_m) / sum relu(g_j)``; a neuron with no positive gate goes to the
  remainder (the reference drops it).
- ``max``: the whole neuron to the eligible component with the largest gate.
- ``linear``: ``relu(g_m - min_eligible g)`` normalised; equal shares when all eligible
  gates are equal (the reference shifts by the float minimum and loses the neuron).
- ``taylor``: ``g_m / g`` (first-order share of the true gate), not a convex split.

Eligibility (softmax, relu, max, linear): a component takes part in a position's split
only where its vector is non-zero (it is *present*); its gate value never decides that, as
a present component's gate can cancel to exactly 0.0. The gates of the *floored* rows (the
remainder, and the last component of every layout, which the reference treats as its
remainder) count as absent below ``REMAINDER_GATE_EPS``; a neuron with no eligible
component goes wholly to the remainder. Ineligible gates are marked ``-inf`` in place, so
no rule needs a mask of the gate tensor's size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

SplitRule = Literal["softmax", "relu", "max", "linear", "taylor"]
SPLIT_RULES: tuple[str, ...] = ("softmax", "relu", "max", "linear", "taylor")

REMAINDER_GATE_EPS = 1e-5


@dataclass(frozen=True)
class SplitSpec:
    """How to split one chunk of positions.

    Attributes:
        rule: the coefficient rule.
        temperature: softmax temperature.
        anchor: index (on the chunk's component axis) of the component that holds the
            first token: its gate is set to 1.0 at position 0 before the split, and the
            first-token rule applies to it. ``None`` when it is not in the chunk.
        first_token_rule: the first-token rule applies: the anchor takes no share after
            position 0.
        starts_at_zero: the chunk's first position is position 0 of the prompt.
        floored: indices of the components whose gates below ``REMAINDER_GATE_EPS``
            count as absent (the remainder, and the last component of the layout).
        gate_scale: the factor the gates were multiplied by before the split (``1 / T``
            for softmax, folded into the normalisation so that no pass divides by ``T``).
    """

    rule: SplitRule
    temperature: float
    anchor: int | None
    first_token_rule: bool
    starts_at_zero: bool
    floored: tuple[int, ...] = (0,)

    @property
    def gate_scale(self) -> float:
        return 1.0 / self.temperature if self.rule == "softmax" else 1.0


def neuron_shares(
    gates: torch.Tensor,
    act: torch.Tensor,
    true_gate: torch.Tensor,
    present: torch.Tensor,
    spec: SplitSpec,
    fused: bool = False,
) -> torch.Tensor:
    """Each component's share of each neuron's activation.

    Args:
        gates: (M, ..., P, I) component gate pre-activations times ``spec.gate_scale``
            (``...``: batch axes, e.g. the prompts of a batch); the FIRST component is the
            remainder. Modified in place.
        act: (..., P, I) true neuron activations ``a``.
        true_gate: (..., P, I) true gate pre-activations ``g``.
        present: (M, ..., P) bool, whether each component's vector is non-zero at each
            position (what eligibility is decided from; unused by ``taylor``).
        spec: the rule and the first-token settings.
        fused: compute the softmax split with one compiled kernel (``torch.compile``)
            instead of a pass per operation; the same numbers up to float rounding.

    Returns:
        (M, ..., P, I) shares whose sum over components is ``act`` (up to rounding).
    """
    if spec.rule == "taylor":
        ratio = torch.where(true_gate != 0, act / true_gate, torch.zeros_like(act))
        return gates.mul_(ratio)

    # Eligibility first, so that afterwards "eligible" is simply "gate > -inf" everywhere:
    # an ineligible gate is set to -inf (its value is never used again).
    scale = spec.gate_scale
    absent = float("-inf")
    gates.masked_fill_(present.logical_not()[..., None], absent)
    if spec.anchor is not None and spec.starts_at_zero:
        gates[spec.anchor, ..., 0, :] = scale  # a gate of 1.0
    for index in spec.floored:
        row = gates[index]
        row.masked_fill_(row.abs() < REMAINDER_GATE_EPS * scale, absent)
    if spec.anchor is not None and spec.first_token_rule:
        gates[spec.anchor, ..., 1 if spec.starts_at_zero else 0 :, :] = absent

    if fused and spec.rule == "softmax":
        shares, unassigned = _compiled_softmax()(gates, act)
    else:
        weights, total = _RULES[spec.rule](gates)  # unnormalised, and their sum
        assigned = total > 0  # (..., P, I)
        shares = weights.mul_(act / torch.where(assigned, total, torch.ones_like(total)))
        unassigned = torch.where(assigned, torch.zeros_like(act), act)
    shares[0] += unassigned  # a neuron no component may take goes to the remainder
    return shares


def _softmax(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = gates  # g / T, -inf for the ineligible
    peak = logits.amax(0, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = logits.sub_(peak).exp_()  # exp(-inf) = 0 for the ineligible
    return weights, weights.sum(0)


def _softmax_shares(gates: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax split as one function of tensors (what :func:`torch.compile` fuses):
    shares, and the activation no component may take."""
    peak = gates.amax(0, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = (gates - peak).exp()
    total = weights.sum(0)
    assigned = total > 0
    ratio = torch.where(assigned, act / torch.where(assigned, total, 1.0), 0.0)
    return weights * ratio, torch.where(assigned, 0.0, act)


@functools.cache
def _compiled_softmax() -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """:func:`_softmax_shares` compiled once per process, for any chunk shape."""
    return torch.compile(_softmax_shares, dynamic=True)


def _relu(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = gates.clamp_(min=0)  # ineligible (-inf) gates become 0
    return weights, weights.sum(0)


def _max(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    any_eligible = gates.amax(0) > float("-inf")
    winner = gates.argmax(0, keepdim=True)  # ineligible gates are -inf
    weights = torch.zeros_like(gates).scatter_(0, winner, 1.0).mul_(any_eligible)
    return weights, any_eligible.to(gates.dtype)


def _linear(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eligible = gates > float("-inf")
    floor = gates.masked_fill(~eligible, float("inf")).amin(0, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    weights = gates.sub_(floor).clamp_(min=0).mul_(eligible)
    # All eligible gates equal (a single eligible component included): equal shares.
    tied = (weights.sum(0, keepdim=True) == 0) & eligible.any(0, keepdim=True)
    weights = torch.where(tied, eligible.to(weights.dtype), weights)
    return weights, weights.sum(0)


_RULES = {"softmax": _softmax, "relu": _relu, "max": _max, "linear": _linear}
