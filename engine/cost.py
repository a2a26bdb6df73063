"""How long a decomposition takes, estimated from its work before any model work.

The work of a request is counted in floating-point operations (FLOPs) from the same shape
facts the memory estimate uses (:class:`engine.memory.Shape`) and the planned request
(:class:`engine.plan.Plan`): the forward pass, then, for each layer the components cross,
each component row at each position where it may be non-zero (a token component from its
own position on, so token runs grow as N^2):

- attention: the value and output projections of the row, and the mixing over the
  positions before each query (the causal triangle, N^3 / 3 for a token run);
- MLP: the gate projection and the down projection of its share, and the split itself
  (elementwise: :data:`SPLIT_PASSES` passes over the neurons, :data:`HIDDEN_PASSES` over
  the hidden width).

Seconds are the matrix products' FLOPs over the device's matrix-product rate (discounted
by :data:`EFFICIENCY`, and the mixing by :data:`MIXING_EFFICIENCY`), plus the elementwise
work at :data:`ELEMENT_FLOPS` FLOPs an element; the rate is measured once at start-up, in
about 0.1 s, as the median of short runs (:func:`measure_rates`). A service refuses a
request whose estimate is over its timeout (:class:`TimeBudgetError`) and says what
would fit.

The forward strategy is the only one counted here; a strategy's own branch (a reverse
pass) goes in :func:`plan_work`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from engine.errors import RequestError

if TYPE_CHECKING:
    from engine.memory import Shape
    from engine.plan import Plan

#: Elementwise passes over the neurons per component and position (the softmax split's
#: exponentials, maxima, sums, masks and shares; the other rules do fewer).
SPLIT_PASSES = 3
#: Elementwise passes over the hidden width per component and position (norms,
#: eligibility, additions into the components).
HIDDEN_PASSES = 5
#: The share of the measured matrix-product rate the propagation's products reach (they
#: are smaller and thinner than the calibration's). This constant and the next two were
#: fitted on the embedded model on one CPU core (token runs at N = 512 and 2,000); the
#: same constants put SmolLM2-135M at N = 128 and 512 within 0.7-1.1x (docs/operations.md).
EFFICIENCY = 0.6
#: The share of that rate the attention mixing reaches (batched products over the
#: causal triangle with a head's width, d_h, as their inner size).
MIXING_EFFICIENCY = 0.1
#: What one element of elementwise work costs, in FLOPs of the measured matrix product
#: (memory-bound passes over tensors far larger than the caches, with their allocations).
ELEMENT_FLOPS = 115
#: Side of the square matrices of the start-up measurement.
CALIBRATION_SIDE = 512


@dataclass(frozen=True)
class Work:
    """The work of a planned request: FLOPs of matrix products (the forward pass, the
    decomposition's projections, its attention mixing) and elementwise operations
    (elements touched, the decomposition)."""

    forward: float
    decompose: float
    mixing: float
    elementwise: float

    @property
    def flops(self) -> float:
        return self.forward + self.decompose + self.mixing


@dataclass(frozen=True)
class Rates:
    """What the device does per second: FLOPs of a matrix product, elements of
    elementwise work (:func:`measure_rates`)."""

    matmul: float
    elementwise: float


def plan_work(shape: Shape, plan: Plan) -> Work:
    """The work of ``plan`` on a model of ``shape``."""
    m = shape.model
    n = plan.num_tokens
    d, heads, dh = m.hidden_size, m.num_heads, m.head_dim
    kv = m.num_kv_heads * dh
    width = shape.traced  # the neurons one position computes (a mixture: its chosen experts)
    # per row and position: value and output projections, gate and down projections
    linear = 2 * d * kv + 2 * heads * dh * d + 4 * d * width
    forward = m.num_layers * n * (2 * shape.layer_weight_elements + 2 * heads * dh * n)
    forward += 2 * d * m.vocab_size  # the last position's logits
    if plan.strategy == "reverse":
        # one frozen pass of the true state from the earliest start, and its backward
        # pass (about two passes) for each scored (position, target) logit
        passes = 1 + 2 * len(plan.positions) * plan.target_count
        layers = (plan.end - min(plan.layers)) * passes
        if plan.light_trace:  # each layer's probabilities recomputed, twice
            forward += 2 * m.num_layers * n * (2 * heads * dh * d + 2 * heads * dh * n)
        return Work(
            forward=float(forward),
            decompose=float(layers * n * linear),
            mixing=float(layers * heads * dh * n * n),
            elementwise=float(layers * n * (SPLIT_PASSES * width + HIDDEN_PASSES * d)),
        )
    starts = row_starts(plan)
    row_positions = sum(n - p for p in starts)
    mixing = sum(heads * dh * (n - p) ** 2 for p in starts)  # 2 H dh per (query, key) pair
    layers = sum(plan.end - layer for layer in plan.layers)
    return Work(
        forward=float(forward),
        decompose=float(layers * row_positions * linear),
        mixing=float(layers * mixing),
        elementwise=float(layers * row_positions * (SPLIT_PASSES * width + HIDDEN_PASSES * d)),
    )


def row_starts(plan: Plan) -> list[int]:
    """The first position where each row (the remainder and the components) may be
    non-zero: a token's own position, a group's first; 0 for the other granularities."""
    rows = [0]  # the remainder
    if plan.groups is not None:
        covered = {p for g in plan.groups for p in g}
        rows += [min(g) for g in plan.groups]
        rest = [p for p in range(plan.num_tokens) if p not in covered]
        rows += [min(rest)] if rest else []
    elif plan.late_starts:
        rows += list(range(plan.components))
    else:
        rows += [0] * plan.components
    return rows


def measure_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> Rates:
    """The device's rates: a square matrix product's FLOPs per second (the median of
    short runs after a warm-up, about 0.1 s in all on a CPU core), and from it the
    elementwise rate (:data:`ELEMENT_FLOPS`: a separate elementwise measurement varies
    several-fold with the allocator's state and the cache)."""
    a = torch.randn(CALIBRATION_SIDE, CALIBRATION_SIDE, device=device, dtype=dtype)
    b = torch.randn_like(a)
    matmul = 2 * CALIBRATION_SIDE**3 / _typical_time(device, lambda: torch.mm(a, b))
    return Rates(matmul=matmul, elementwise=matmul / ELEMENT_FLOPS)


def seconds(work: Work, rates: Rates) -> float:
    """Estimated seconds of ``work`` at the measured ``rates``."""
    products = (work.forward + work.decompose) / (rates.matmul * EFFICIENCY)
    mixing = work.mixing / (rates.matmul * MIXING_EFFICIENCY)
    return products + mixing + work.elementwise / rates.elementwise


def _typical_time(device: torch.device, run: Callable[[], object], repeats: int = 30) -> float:
    """The median time of ``run`` over ``repeats`` runs after a warm-up: what the device
    does now, other work on it included (the best run would be an idle device's)."""
    times = []
    for index in range(repeats + 1):
        _sync(device)
        clock = time.perf_counter()
        run()
        _sync(device)
        if index:  # the first is the warm-up
            times.append(time.perf_counter() - clock)
    return max(statistics.median(times), 1e-9)


class TimeBudgetError(RequestError):
    """The request's estimated time is over the engine's time budget (HTTP 413)."""

    def __init__(self, field: str, estimate_s: float, budget_s: float, hints: list[str]) -> None:
        advice = "; ".join(hints) if hints else "send a shorter input"
        super().__init__(
            field,
            f"needs an estimated {estimate_s:.0f} s of compute on this device, over the "
            f"limit of {budget_s:g} s (DEPASS_REQUEST_TIMEOUT_S); what would fit: {advice}",
        )
        self.estimate_s = estimate_s
        self.budget_s = budget_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fitting(shape: Shape, plan: Plan, rates: Rates, budget_s: float) -> list[str]:
    """What would fit ``budget_s``, as advice: the longest input at this request's shape,
    token groups instead of single tokens, fewer start layers, the reverse strategy."""
    hints = []
    estimate = lambda p: seconds(plan_work(shape, p), rates)  # noqa: E731
    longest = _longest_input(plan, estimate, budget_s)
    if longest is not None:
        hints.append(f"an input of at most {longest} tokens")
    if plan.groups is None and plan.late_starts:
        groups = _fitting_groups(plan, estimate, budget_s)
        if groups is not None:
            hints.append(f"token groups (e.g. {groups} groups of consecutive positions)")
    if len(plan.layers) > 1:
        one = replace(plan, layers=plan.layers[-1:])
        if estimate(one) <= budget_s:
            hints.append("fewer start layers (one at a time)")
    if plan.strategy == "forward":
        reverse = replace(plan, strategy="reverse")
        if estimate(reverse) <= budget_s:
            hints.append(
                "strategy='reverse' with mlp_split='taylor' and scores only (every "
                "component's score from one gradient)"
            )
    return hints


def _longest_input(plan: Plan, estimate: Callable[[Plan], float], budget_s: float) -> int | None:
    """The most tokens a request of this shape may have within ``budget_s`` (None: not
    even one token)."""

    def shorter(n: int) -> Plan:
        components = n if plan.late_starts and plan.groups is None else plan.components
        return replace(plan, input_ids=plan.input_ids[:n], components=components, groups=None)

    low, high = 0, plan.num_tokens - 1
    while low < high:
        middle = (low + high + 1) // 2
        if estimate(shorter(middle)) <= budget_s:
            low = middle
        else:
            high = middle - 1
    return low or None


def _fitting_groups(plan: Plan, estimate: Callable[[Plan], float], budget_s: float) -> int | None:
    """The most groups of consecutive positions that fit ``budget_s`` (at least 2)."""
    n = plan.num_tokens
    best = None
    for count in (2, 4, 8, 16, 32, 64):
        if count > n:
            break
        size = -(-n // count)
        groups = [list(range(p, min(n, p + size))) for p in range(0, n, size)]
        if estimate(replace(plan, groups=groups, components=len(groups))) > budget_s:
            break
        best = len(groups)
    return best
