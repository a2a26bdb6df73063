"""Run planned requests: put their runs into batches, start, propagate and read them out.

A *run* is one request at one start layer (:mod:`engine.plan`). Forward runs with equal
settings are stacked into padded batches within the memory budget and propagated together
(:mod:`engine.propagate`); reverse requests run alone, one frozen pass and one backward
pass each (:mod:`engine.reverse`). Each request's runs are then assembled into its result
(:mod:`engine.readout`). :class:`engine.engine.DePassEngine` plans; this module runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.capture import ForwardTrace, trace_forward_many
from engine.families import Family
from engine.granularity import GRANULARITY_KINDS, RunStart
from engine.memory import MemoryEstimate
from engine.parts import cap_logits
from engine.plan import Plan, Run, batch_estimate, schedule
from engine.propagate import Cancelled, Member, Propagator, SplitSettings, StartFacts
from engine.readout import FrozenReadout, TargetHead, View
from engine.request import AttributionRequest
from engine.result import AttributionResult
from engine.reverse import FrozenPass
from engine.trace_cache import TraceCache
from engine.view import ModelView


@dataclass(frozen=True)
class BatchRunner:
    """Runs planned requests on one model (the engine's parts and settings)."""

    model: nn.Module
    family: Family
    view: ModelView
    readout: FrozenReadout
    traces: TraceCache
    memory_budget_bytes: int
    max_batch: int
    batch_max_cells: int
    compile: bool

    def run(
        self,
        requests: Sequence[AttributionRequest],
        plans: Sequence[Plan],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[AttributionResult]:
        """The results of ``requests`` (planned as ``plans``), in the order asked
        (:meth:`engine.engine.DePassEngine.attribute_many`)."""
        outcomes: dict[tuple[int, int], _RunOutcome] = {}
        batches = schedule(
            requests,
            plans,
            self.max_batch,
            self.batch_max_cells,
            lambda batch: self._batch_memory(plans, batch)[0].total <= self.memory_budget_bytes,
        )
        # The forward pass of a prompt serves all of its runs (start layers) in this call,
        # cache or no cache; it is let go after the last batch that needs it.
        uses = Counter(tuple(plans[i].input_ids) for batch in batches for i, _ in batch)
        held: dict[tuple[int, ...], ForwardTrace] = {}
        reverse = [i for i, plan in enumerate(plans) if plan.strategy == "reverse"]
        uses.update(tuple(plans[i].input_ids) for i in reverse)
        # no_grad rather than inference_mode: a reverse run differentiates through the
        # trace's frozen tensors, which inference tensors would not allow
        with torch.no_grad():
            work = [(batch, None) for batch in batches] + [(None, i) for i in reverse]
            for batch, index in work:
                if batch is not None:
                    done = self._run_batch(requests, plans, batch, should_stop, held)
                    indices = [i for i, _ in batch]
                else:
                    assert index is not None
                    done = self._run_reverse(
                        index, requests[index], plans[index], should_stop, held
                    )
                    indices = [index]
                outcomes.update(done)
                for i in indices:
                    key = tuple(plans[i].input_ids)
                    uses[key] -= 1
                    if not uses[key]:
                        held.pop(key, None)
            return [
                self._result(request, plan, outcomes, i)
                for i, (request, plan) in enumerate(zip(requests, plans, strict=True))
            ]

    def _batch_memory(self, plans: Sequence[Plan], batch: list[Run]) -> tuple[MemoryEstimate, int]:
        return batch_estimate(self.view.shape, plans, batch, self.memory_budget_bytes)

    def _run_batch(
        self,
        requests: Sequence[AttributionRequest],
        plans: Sequence[Plan],
        batch: list[tuple[int, int]],
        should_stop: Callable[[], bool] | None,
        held: dict[tuple[int, ...], ForwardTrace],
    ) -> dict[tuple[int, int], _RunOutcome]:
        """Trace, start and propagate one batch of runs (one start layer, many prompts);
        ``held`` keeps the traces later batches of the call still need."""
        clock = time.perf_counter()
        memory, chunk_budget = self._batch_memory(plans, batch)
        keys = [tuple(plans[i].input_ids) for i, _ in batch]
        self.traces.make_room(memory.total, self.memory_budget_bytes, set(keys) | set(held))
        missing = [key for key in dict.fromkeys(keys) if key not in held]
        if missing:
            held.update(zip(missing, self.traces.get_many(missing), strict=True))
        traces = [held[key] for key in keys]
        forward_s = time.perf_counter() - clock
        clock = time.perf_counter()
        lead = requests[batch[0][0]]
        layer, end = batch[0][1], plans[batch[0][0]].end
        members: list[Member] = []
        for (i, _), trace in zip(batch, traces, strict=True):
            if should_stop is not None and should_stop():
                raise Cancelled("the attribution was cancelled")
            kind = GRANULARITY_KINDS[requests[i].granularity]
            start = kind.start(RunStart(self.view, requests[i], trace, layer, plans[i].groups))
            positions = torch.tensor(plans[i].positions, dtype=torch.long)
            members.append(Member(start=start, length=trace.num_tokens, positions=positions))
        labels = [member.start.labels for member in members]
        split = SplitSettings(
            rule=lead.mlp_split,
            temperature=lead.temperature,
            first_token_rule=plans[batch[0][0]].first_token_rule,
        )
        # Members whose start facts differ (a group layout, say) run as separate batches.
        by_facts: dict[StartFacts, list[int]] = {}
        for index, member in enumerate(members):
            by_facts.setdefault(member.start.facts(split), []).append(index)
        for indices in by_facts.values():
            propagator = Propagator(
                self.model,
                self.family,
                [traces[k] for k in indices],
                self.view.compute_dtype,
                chunk_budget,
                should_stop,
                self.view.matmul_dtype,
                fused_split=self.compile,
            )
            propagator.check()
            propagator.run([members[k] for k in indices], split, end, lead.all_layers)
        outcomes: dict[tuple[int, int], _RunOutcome] = {}
        for k, ((i, _), member, trace) in enumerate(zip(batch, members, traces, strict=True)):
            request, plan = requests[i], plans[i]
            targets, head = self._targets(plan, trace, member.positions)
            scaled = request.end_layer is None and not request.all_layers
            keep_states = "states" in request.outputs
            views = [
                self.readout.view(snap, trace, scaled, member.positions, head, keep_states)
                for snap in member.snapshots
            ]
            member.snapshots = []
            start = member.start
            outcomes[(i, layer)] = _RunOutcome(
                labels=labels[k],
                first_positions=[start.first_position[row - 1] for row in start.output_rows],
                targets=targets,
                views=views,
                batch_size=len(batch),
                timings={"forward_s": forward_s, "decompose_s": 0.0},
            )
        decompose_s = time.perf_counter() - clock
        for outcome in outcomes.values():  # a batch's time is shared by its members
            outcome.timings["decompose_s"] = decompose_s
        return outcomes

    def _targets(
        self, plan: Plan, trace: ForwardTrace, positions: torch.Tensor
    ) -> tuple[list[list[int]], TargetHead]:
        """Each kept position's scored ids (P, T) and their unembedding rows: the asked
        targets, or each position's own top-1 next token."""
        if plan.target_ids is None:
            tops = self.readout.top_tokens(trace, positions)
            targets = [[token] for token in tops]
            return targets, self.readout.for_position_targets(targets)
        targets = [list(plan.target_ids)] * len(plan.positions)
        return targets, self.readout.for_targets(plan.target_ids)

    def _run_reverse(
        self,
        index: int,
        request: AttributionRequest,
        plan: Plan,
        should_stop: Callable[[], bool] | None,
        held: dict[tuple[int, ...], ForwardTrace],
    ) -> dict[tuple[int, int], _RunOutcome]:
        """Every run (start layer) of a reverse request from one frozen pass and one
        backward pass over its (position, target) logits (:mod:`engine.reverse`)."""
        clock = time.perf_counter()
        key = tuple(plan.input_ids)
        self.traces.make_room(plan.memory.total, self.memory_budget_bytes, {key} | set(held))
        if key in held:
            trace = held[key]
        elif plan.light_trace:  # not cached: other requests need the probabilities
            ids = torch.tensor(key, dtype=torch.long)
            trace = trace_forward_many(self.model, self.family, [ids], keep_probs=False)[0]
        else:
            trace = held[key] = self.traces.get_many([key])[0]
        forward_s = time.perf_counter() - clock
        clock = time.perf_counter()
        kind = GRANULARITY_KINDS[request.granularity]
        positions = torch.tensor(plan.positions, dtype=torch.long)
        targets, head = self._targets(plan, trace, positions)
        propagator = Propagator(
            self.model,
            self.family,
            [trace],
            self.view.compute_dtype,
            plan.chunk_budget,
            should_stop,
            self.view.matmul_dtype,
        )
        stages = [kind.start_stage(layer, request) for layer in plan.layers]
        frozen = FrozenPass(propagator, trace, min(stages), plan.end)
        grads = frozen.gradients(self.readout, head, positions, request.end_layer is None, stages)
        propagator.check()
        count, width = len(plan.positions), len(targets[0])
        runs = {}
        for layer in plan.layers:
            run = kind.reverse_scores(
                RunStart(self.view, request, trace, layer, plan.groups), grads
            )
            scores = run.scores  # (M + 1, K): the remainder's start row first
            scores[0] += grads.remainder_from(run.stage)
            per_position = scores.reshape(-1, count, width).permute(1, 0, 2)  # (P, M + 1, T)
            view = View(
                states=None,
                scores=per_position.to("cpu", self.view.compute_dtype),
                error=grads.error,
                relative_error=grads.relative_error,
            )
            runs[layer] = (run, view)
        decompose_s = time.perf_counter() - clock
        return {
            (index, layer): _RunOutcome(
                labels=run.labels,
                first_positions=run.first_positions,
                targets=targets,
                views=[view],
                batch_size=1,
                timings={"forward_s": forward_s, "decompose_s": decompose_s},
            )
            for layer, (run, view) in runs.items()
        }

    def _result(
        self,
        request: AttributionRequest,
        plan: Plan,
        outcomes: dict[tuple[int, int], _RunOutcome],
        index: int,
    ) -> AttributionResult:
        """Assemble one request's result from the outcomes of its runs."""
        runs = [outcomes.pop((index, layer)) for layer in plan.layers]
        if request.all_layers:
            axis: list[int] | None = list(range(plan.layers[0], plan.end + 1))
        elif isinstance(request.start_layer, list):
            axis = plan.layers
        else:
            axis = None
        views = [view for run in runs for view in run.views]
        per_layer = [run.labels for run in runs]
        differ = any(labels != per_layer[0] for labels in per_layer)
        targets = runs[-1].targets
        labels = Labels(
            # runs over several layers: layer-free labels, and each layer's own
            components=[_without_layer(name) for name in per_layer[0]] if differ else per_layer[0],
            layer_components=per_layer if differ else None,
            first_positions=runs[-1].first_positions,
            position_targets=targets,
            position_target_tokens=[self.view.token_texts(row) for row in targets],
        )
        texts = self.view.token_texts(plan.input_ids)
        result = assemble(
            request,
            labels,
            views,
            axis,
            plan.end,
            plan.positions,
            texts,
            plan.input_ids,
            softcap=self.view.info.logit_softcap,
        )
        result.strategy = plan.strategy
        if request.top_k is not None:
            result = result.keep_top(request.top_k)
        result.timings = {
            "forward_s": sum(run.timings["forward_s"] for run in runs),
            "decompose_s": sum(run.timings["decompose_s"] for run in runs),
            "batch_size": float(max(run.batch_size for run in runs)),
        }
        result.ignore_bos = plan.first_token_rule
        return result


@dataclass
class _RunOutcome:
    """What one run (a request at one start layer) leaves for its result."""

    labels: list[str]
    first_positions: list[int]  # (M,) in the labels' order
    targets: list[list[int]]  # (P, T) each kept position's scored ids
    views: list[View]
    batch_size: int  # runs propagated together with this one (1: alone)
    timings: dict[str, float]


def _without_layer(label: str) -> str:
    """``"L3.H0"`` -> ``"H0"``: a label of a result whose layer axis names the layer."""
    head, dot, rest = label.partition(".")
    return rest if dot and head[:1] == "L" and head[1:].isdigit() else label


@dataclass(frozen=True)
class Labels:
    """What names the axes of a result: components, their first positions, targets."""

    components: list[str]  # (M,)
    layer_components: list[list[str]] | None  # ([layers,] M) when they differ by layer
    first_positions: list[int]  # (M,)
    position_targets: list[list[int]]  # (P, T)
    position_target_tokens: list[list[str]]  # (P, T)


def assemble(
    request: AttributionRequest,
    labels: Labels,
    views: list[View],
    layers: list[int] | None,
    end: int,
    positions: list[int],
    texts: list[str],
    input_ids: Sequence[int],
    softcap: float | None = None,
) -> AttributionResult:
    """Stack the views (a leading layer axis when ``layers`` is set) into a result;
    ``softcap``: the model's final soft-cap, applied to the summed logits as well."""

    def pick(arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(arrays) if layers is not None else arrays[-1]

    want_states = "states" in request.outputs
    want_scores = "scores" in request.outputs
    return AttributionResult(
        tokens=texts,
        input_ids=list(input_ids),
        components=labels.components,
        layer_components=labels.layer_components,
        first_positions=labels.first_positions,
        positions=positions,
        targets=labels.position_targets[-1],
        target_tokens=labels.position_target_tokens[-1],
        position_targets=labels.position_targets,
        position_target_tokens=labels.position_target_tokens,
        granularity=request.granularity,
        mlp_split=request.mlp_split,
        end="output" if request.end_layer is None else f"layer {end}",
        layers=layers,
        states=pick([v.states[:, 1:] for v in views if v.states is not None])
        if want_states
        else None,
        remainder=pick([v.states[:, 0] for v in views if v.states is not None])
        if want_states
        else None,
        scores=pick([v.scores[:, 1:] for v in views]) if want_scores else None,
        remainder_scores=pick([v.scores[:, 0] for v in views]) if want_scores else None,
        logits=pick([v.scores.sum(1) for v in views]),
        logit_softcap=softcap,
        capped_logits=None
        if softcap is None
        else cap_logits(pick([v.scores.sum(1) for v in views]), softcap),
        conservation_error=max(v.error for v in views),
        relative_conservation_error=max(v.relative_error for v in views),
    )
