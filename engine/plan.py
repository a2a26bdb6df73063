"""A request planned before any model work, and how planned runs are put into batches.

:class:`Plan` is a validated request with its memory estimate; a *run* is one request at
one start layer, ``(request index, start layer)``. :func:`schedule` groups runs that can
propagate together (:func:`batch_key` equal, within the cell and size limits and the
memory budget) in request order; :func:`batch_estimate` sizes one such batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.errors import RequestError
from engine.granularity import GRANULARITY_KINDS
from engine.memory import MemoryEstimate, Shape, estimate
from engine.request import AttributionRequest, RunStrategy

#: One run: (index of the request in the call, start layer).
Run = tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """A validated request, sized before any model work (see :meth:`DePassEngine.plan`)."""

    input_ids: list[int]
    positions: list[int]  # non-negative, in the order asked
    groups: list[list[int]] | None
    layers: list[int]  # start layers (one run each)
    end: int  # the residual entering this layer (L: the output)
    components: int  # M, the remainder not counted
    snapshots: int  # entries of the leading layer axis (1 when there is none)
    target_ids: list[int] | None  # resolved targets; None: the model's top-1, known after the pass
    hidden_size: int
    intermediate_size: int
    outputs: tuple[str, ...]
    element_bytes: int
    memory: MemoryEstimate  # peak memory of the request beyond the weights, by part
    chunk_budget: int  # what the estimate leaves for attention blocks and MLP chunks
    late_starts: bool  # components start at different positions (causal skipping pays)
    strategy: RunStrategy = "forward"  # as chosen for this request
    # reverse: the trace keeps no attention probabilities (recomputed layer by layer), as
    # a long prompt's would not fit the budget otherwise
    light_trace: bool = False
    first_token_rule: bool = False  # the rule applied (ignore_bos, or its default here)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def target_count(self) -> int:
        """How many targets each position scores (its top-1 alone when none are asked)."""
        return 1 if self.target_ids is None else len(self.target_ids)

    @property
    def cells(self) -> int:
        """(M + 1) x N: the size of the work, for batching decisions."""
        return (self.components + 1) * self.num_tokens

    def result_bytes(self, element_bytes: int | None = None) -> int:
        """Bytes of the arrays the result will hold (states, remainder, scores, logits)."""
        size = element_bytes or self.element_bytes
        rows = self.snapshots * len(self.positions) * (self.components + 1)
        total = self.snapshots * len(self.positions) * self.target_count  # logits
        if "states" in self.outputs:
            total += rows * self.hidden_size
        if "scores" in self.outputs:
            total += rows * self.target_count
        return total * size

    def working_bytes(self) -> int:
        """Upper bound of the memory the request holds at once beyond the weights (its
        trace, components, one layer's frozen values, snapshots and chunked work): at
        most the engine's budget, or :meth:`DePassEngine.plan` refuses the request."""
        return self.memory.total


def normalise_positions(values: Sequence[int] | None, length: int, field: str) -> list[int]:
    """Positions of a ``length``-token prompt as non-negative indices (negative ones count
    from the end; ``None``: all), refused when outside the prompt or empty."""
    if values is None:
        return list(range(length))
    out = []
    for p in values:
        if not -length <= p < length:
            raise RequestError(field, f"position {p} is outside [-{length}, {length})")
        out.append(p % length)
    if not out:
        raise RequestError(field, "must name at least one position")
    return out


def batch_key(request: AttributionRequest, plan: Plan, layer: int) -> tuple:
    """Runs with equal keys may share a batch: the same start stage, end, split and
    snapshots (their start facts are compared again once the starts are built)."""
    return (
        plan.strategy,
        layer,
        plan.end,
        request.granularity,
        GRANULARITY_KINDS[request.granularity].batch_key(request),
        request.mlp_split,
        request.temperature,
        plan.first_token_rule,
        request.all_layers,
        request.end_layer is None,
    )


def batch_estimate(
    shape: Shape, plans: Sequence[Plan], batch: Sequence[Run], budget_bytes: int
) -> tuple[MemoryEstimate, int]:
    """The memory estimate of a batch of runs (padded to its largest member) and the
    budget it leaves for chunks."""
    if len(batch) == 1:
        plan = plans[batch[0][0]]
        return plan.memory, plan.chunk_budget
    members = [plans[i] for i, _ in batch]
    return estimate(
        shape,
        rows=max(p.components for p in members) + 1,
        length=max(p.num_tokens for p in members),
        positions=max(len(p.positions) for p in members),
        snapshots=max(p.snapshots for p in members),
        targets=max(p.target_count for p in members),
        members=len(members),
        late_starts=all(p.late_starts for p in members),
        budget_bytes=budget_bytes,
    )


def schedule(
    requests: Sequence[AttributionRequest],
    plans: Sequence[Plan],
    max_batch: int,
    max_cells: int,
    fits: Callable[[list[Run]], bool],
) -> list[list[Run]]:
    """Every forward request's runs grouped into batches, in request order (a reverse
    request runs all its layers in one pass of its own): a run joins the open
    batch of its :func:`batch_key` while that batch has fewer than ``max_batch`` runs and
    still ``fits`` (the memory budget) with it; runs over ``max_cells`` run alone."""
    batches: list[list[Run]] = []
    open_batches: dict[tuple, list[Run]] = {}
    for i, (request, plan) in enumerate(zip(requests, plans, strict=True)):
        for layer in plan.layers:
            run = (i, layer)
            if plan.strategy == "reverse":  # all of a request's layers in one pass, alone
                continue
            if plan.cells > max_cells or max_batch < 2:
                batches.append([run])
                continue
            key = batch_key(request, plan, layer)
            batch = open_batches.get(key)
            if batch is not None and len(batch) < max_batch and fits([*batch, run]):
                batch.append(run)
                continue
            batch = [run]
            open_batches[key] = batch
            batches.append(batch)
    return batches


def reverse_is_cheaper(plan_rows: int, stages: Sequence[int], end_stage: int, scored: int) -> bool:
    """Whether the reverse strategy costs less than the forward one, counted in
    (row x stage) units of the same per-position work.

    Forward: each run carries its ``plan_rows`` rows (M + 1) from its start stage to the
    end (a token run's rows are alive from their own position on: about half).
    Reverse: one pass from the earliest start carries the true state (and the biases'
    row through the MLPs), and the backward pass costs about two passes per scored
    (position, target) logit.
    """
    forward = sum(plan_rows * (end_stage - stage) for stage in stages)
    reverse = (3 + 2 * scored) * (end_stage - min(stages))
    return reverse < forward
