"""DePassEngine: load a causal LM once, answer attribution requests on it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.capture import ForwardTrace
from engine.families import Family, family_for, family_named
from engine.granularity import GRANULARITY_KINDS, Granularity, RunStart, head_labels
from engine.info import ModelInfo
from engine.loading import (
    causal_lm_class_name,
    dequantised_folder,
    gguf_location,
    load_tokenizer,
    require_resident,
    resolve_dtype,
)
from engine.memory import (
    MemoryBudgetError,
    MemoryEstimate,
    Shape,
    auto_budget_bytes,
    estimate,
)
from engine.propagate import (
    Cancelled,
    Member,
    Propagator,
    SplitSettings,
    StartFacts,
)
from engine.readout import Labels, Readout, View, assemble
from engine.request import AttributionRequest, RequestError, check_one_input
from engine.result import AttributionResult
from engine.trace_cache import TraceCache


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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> int:
        """Number of scored targets."""
        return 1 if self.target_ids is None else len(self.target_ids)

    @property
    def cells(self) -> int:
        """(M + 1) x N: the size of the work, for batching decisions."""
        return (self.components + 1) * self.num_tokens

    def result_bytes(self, element_bytes: int | None = None) -> int:
        """Bytes of the arrays the result will hold (states, remainder, scores, logits)."""
        size = element_bytes or self.element_bytes
        rows = self.snapshots * len(self.positions) * (self.components + 1)
        total = self.snapshots * len(self.positions) * self.targets  # logits
        if "states" in self.outputs:
            total += rows * self.hidden_size
        if "scores" in self.outputs:
            total += rows * self.targets
        return total * size

    def working_bytes(self) -> int:
        """Upper bound of the memory the request holds at once beyond the weights (its
        trace, components, one layer's frozen values, snapshots and chunked work): at
        most the engine's budget, or :meth:`DePassEngine.plan` refuses the request."""
        return self.memory.total


class DePassEngine:
    """Decomposed forward passes on one resident model.

    Args:
        model: a supported Hugging Face causal LM using eager attention.
        tokenizer: its tokenizer (optional when requests give ``input_ids``).
        compute_dtype: dtype of the propagated components (float32 keeps conservation
            tight even for bfloat16 weights).
        memory_budget_bytes: all the memory one request may use beyond the weights
            (trace, components, chunked work; see :mod:`engine.memory`): bigger work runs
            in more, smaller chunks, and a request that cannot fit is refused before any
            work. ``None``: what is free once the model is loaded, less 2 GiB on a GPU,
            half the available memory on the CPU.
        trace_cache_size: forward traces kept per prompt (LRU), so that several requests
            on one prompt run the ordinary forward pass once.
        trace_cache_bytes: also evict the oldest traces while the cache holds more than
            this many bytes (one 2048-token trace of an 8B model is ~12 GiB); ``None``: no
            byte limit. The newest trace is always kept while it is in use.
        matmul_dtype: dtype of the matrix products (``None``: the compute dtype). The
            model's bfloat16 on a GPU runs them on tensor cores with float32
            accumulation; components and the MLP split stay in ``compute_dtype``.
        max_batch: most requests :meth:`attribute_many` runs as one batch.
        batch_max_cells: requests with at most this many (components + 1) x tokens are
            batched; bigger ones fill the device alone and run one at a time.
        compile: fuse the softmax MLP split into one kernel with ``torch.compile`` (a
            one-off compilation of seconds at the first request; then 2-3x less time in
            the split). Needs a C++ compiler on the CPU, Triton on CUDA.

    Memory: a request uses at most ``memory_budget_bytes`` beyond the weights, cached
    traces of other prompts included (they are evicted to make room); one whose estimate
    is larger is refused with :class:`engine.MemoryBudgetError` before any model work.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        compute_dtype: torch.dtype = torch.float32,
        memory_budget_bytes: int | None = None,
        trace_cache_size: int = 4,
        trace_cache_bytes: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        max_batch: int = 8,
        batch_max_cells: int = 4096,
        compile: bool = False,
        family: Family | None = None,
    ) -> None:
        declared = family_for(model) if family is None else family
        self.family: Family = declared.for_config(model.config)
        _require_eager(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype
        self.memory_budget_bytes = (
            auto_budget_bytes(p.device for p in model.parameters())
            if memory_budget_bytes is None
            else memory_budget_bytes
        )
        self.matmul_dtype = matmul_dtype or compute_dtype
        self.max_batch = max_batch
        self.batch_max_cells = batch_max_cells
        self.compile = compile
        self.traces = TraceCache(self.model, self.family, trace_cache_size, trace_cache_bytes)
        self.info = self._model_info()
        self.readout = Readout(
            final_norm=self.family.final_norm_module(self.model),
            unembed=self.family.unembed(self.model),
            norm=self.family.final_norm,
            dtype=compute_dtype,
            softcap=self.info.logit_softcap,
        )
        self.shape = self._shape()

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        gguf_file: str | None = None,
        gguf_cache_dir: str | Path | None = None,
        **engine_kwargs: Any,
    ) -> DePassEngine:
        """Load a model and its tokenizer (hub id, model folder or GGUF file) with eager
        attention.

        Args:
            path_or_id: a hub id, a folder saved with ``save_pretrained``, or a ``.gguf``
                file (quantised weights, dequantised to float once and cached).
            device: where the whole model goes (ignored with ``device_map``).
            dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
            device_map: spread the layers over several GPUs with accelerate (``"auto"``
                or an explicit map); the engine then works on each layer where its
                weights are. Offloading to the CPU or disk is refused.
            model_kwargs: more keyword arguments for ``AutoModelForCausalLM.from_pretrained``
                (``revision``, ``max_memory``...).
            gguf_file: the GGUF file's name inside the folder ``path_or_id`` (the
                transformers convention; or give the file's path as ``path_or_id``).
            gguf_cache_dir: where dequantised GGUF weights are cached as safetensors
                (default ``~/.cache/depass/gguf``; 4 bytes per parameter).
            engine_kwargs: passed to the constructor (``memory_budget_bytes``...).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        gguf = gguf_location(path_or_id, gguf_file)
        if gguf is not None:
            metadata = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            family_named([causal_lm_class_name(metadata) or metadata.model_type])
            path_or_id = str(dequantised_folder(gguf, gguf_cache_dir))
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        # fail fast, before loading weights, on unsupported families
        family_named([causal_lm_class_name(config) or str(config.model_type)])
        if device_map is not None and torch.cuda.is_available():
            device = "cuda"
        load = {
            "dtype": resolve_dtype(dtype, device),
            "attn_implementation": "eager",
            "trust_remote_code": trust_remote_code,
            **(model_kwargs or {}),
        }
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path_or_id, **load).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path_or_id, device_map=device_map, **load)
            require_resident(model)
        tokenizer = load_tokenizer(path_or_id, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **engine_kwargs)

    # ------------------------------------------------------------------ model facts

    def _model_info(self) -> ModelInfo:
        """Shape facts, read from the parts' weights (configs name them differently)."""
        config = self.model.config
        family = self.family
        heads = int(config.num_attention_heads)
        first = family.layer(self.model, 0)
        head_width = family.attention.output(first, config).weight.shape[1]  # H d_h
        head_dim = head_width // heads
        embed = family.embeddings(self.model)
        num_layers = len(family.decoder_layers(self.model))
        return ModelInfo(
            architecture=type(self.model).__name__,
            family=family.name,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=family.attention.value(first, config).weight.shape[0] // head_dim,
            head_dim=head_dim,
            hidden_size=int(embed.weight.shape[1]),
            intermediate_size=max(map(self.neuron_width, range(num_layers))),
            vocab_size=int(family.unembed(self.model).weight.shape[0]),
            dtype=str(embed.weight.dtype).removeprefix("torch."),
            device=str(embed.weight.device),
            logit_softcap=family.readout.softcap(config),
        )

    @property
    def adapter(self) -> Family:
        """The model's family (the name this attribute had before families were parts)."""
        return self.family

    def _shape(self) -> Shape:
        size = lambda dtype: torch.finfo(dtype).bits // 8  # noqa: E731
        layers = self.family.decoder_layers(self.model)
        mlps = [(layer, self.family.mlp.for_layer(layer)) for layer in layers]
        return Shape(
            model=self.info,
            model_bytes=size(getattr(torch, self.info.dtype)),
            compute_bytes=size(self.compute_dtype),
            matmul_bytes=size(self.matmul_dtype),
            frozen_norms=self.family.frozen_norms,
            post_norms=self.family.post_norms,
            attention_temporaries=self.family.attention_temporaries,
            mlp_temporaries=self.family.mlp_temporaries,
            parallel=self.family.parallel,
            split_width=max(part.split_width(layer) for layer, part in mlps),
            trace_width=max(part.trace_width(layer) for layer, part in mlps),
        )

    # ------------------------------------------------------------------ tokens

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (special tokens included)."""
        if self.tokenizer is None:
            raise RequestError("prompt", "this engine has no tokenizer; send input_ids")
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat in the tokenizer's own chat template, with the generation
        prompt appended (so the next token is the assistant's first)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if self.tokenizer is None or not template:
            raise RequestError(
                "messages", "this model's tokenizer has no chat template; send prompt or input_ids"
            )
        try:
            encoded = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # the template's own checks (roles must alternate, ...)
            raise RequestError("messages", f"the chat template refused them: {exc}") from None
        return list(encoded["input_ids"])

    def input_ids(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> tuple[list[int], str]:
        """The token ids of a request's input (exactly one of the three) and the name of
        the field that gave them, checked against the vocabulary.

        Raises:
            RequestError: no or several inputs, no tokens, ids outside the vocabulary, no
                chat template for ``messages``.
        """
        check_one_input(prompt, None if input_ids is None else list(input_ids), messages)
        if input_ids is not None:
            ids, field = list(input_ids), "input_ids"
        elif messages is not None:
            ids, field = self.chat_ids(messages), "messages"
        else:
            ids, field = self.tokenize(prompt or ""), "prompt"
        self._check_ids(ids, field)
        return ids, field

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each token."""
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def _resolve_targets(self, targets: Sequence[int | str]) -> list[int]:
        resolved: list[int] = []
        for target in targets:
            if isinstance(target, int):
                if not 0 <= target < self.info.vocab_size:
                    raise RequestError(
                        "targets",
                        f"token id {target} is outside the vocabulary [0, {self.info.vocab_size})",
                    )
                resolved.append(target)
                continue
            ids = self._string_to_id(target)
            if ids is None:
                raise RequestError(
                    "targets", f"{target!r} is not a single token of this tokenizer; send its id"
                )
            resolved.append(ids)
        return resolved

    def _string_to_id(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and text == self.tokenizer.unk_token:
            return unknown
        vocab_id = self.tokenizer.convert_tokens_to_ids(text)
        if isinstance(vocab_id, int) and vocab_id != unknown:
            return vocab_id
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # a string the tokenizer only knows as its unknown token is no token of it
        return ids[0] if len(ids) == 1 and ids[0] != unknown else None

    # ------------------------------------------------------------------ forward pass

    def trace(self, input_ids: Sequence[int]) -> ForwardTrace:
        """The forward trace of ``input_ids``, from the LRU cache when possible."""
        return self.traces.get_many([input_ids])[0]

    def trace_many(self, prompts: Sequence[Sequence[int]]) -> list[ForwardTrace]:
        """Traces of several prompts; those not cached come from one batched forward pass."""
        return self.traces.get_many(prompts)

    def clear_cache(self) -> None:
        """Drop every cached forward trace."""
        self.traces.clear()

    # ------------------------------------------------------------------ attribution

    def plan(self, request: AttributionRequest) -> Plan:
        """Validate ``request`` against the model and size it, without any model work.

        Raises:
            RequestError: the request does not fit the model (names the field).
        """
        input_ids, input_field = self.input_ids(request.prompt, request.input_ids, request.messages)
        length = len(input_ids)
        positions = _normalise_positions(request.positions, length, "positions")
        layers = request.start_layers
        kind = GRANULARITY_KINDS[request.granularity]
        end = self._check_layers(kind, request, layers)
        groups = None
        if request.groups is not None:
            groups = [_normalise_positions(g, length, "groups") for g in request.groups]
        info = self.info
        count = kind.count(self, request, length, groups)
        snapshots = end - layers[0] + 1 if request.all_layers else len(layers)
        target_ids = None if request.targets is None else self._resolve_targets(request.targets)
        memory, chunk_budget = estimate(
            self.shape,
            rows=count + 1,
            length=length,
            positions=len(positions),
            snapshots=snapshots,
            targets=1 if target_ids is None else len(target_ids),
            start_extra=kind.start_bytes(self, count, length),
            late_starts=kind.late_starts(count),
            budget_bytes=self.memory_budget_bytes,
        )
        if memory.total > self.memory_budget_bytes:
            raise MemoryBudgetError(input_field, memory, self.memory_budget_bytes)
        return Plan(
            input_ids=input_ids,
            positions=positions,
            groups=groups,
            layers=layers,
            end=end,
            components=count,
            snapshots=snapshots,
            target_ids=target_ids,
            hidden_size=info.hidden_size,
            intermediate_size=info.intermediate_size,
            outputs=tuple(request.outputs),
            element_bytes=self.shape.compute_bytes,
            memory=memory,
            chunk_budget=chunk_budget,
            late_starts=kind.late_starts(count),
        )

    def attribute(
        self, request: AttributionRequest, should_stop: Callable[[], bool] | None = None
    ) -> AttributionResult:
        """Decompose the prompt of ``request`` and return its components and scores.

        Args:
            request: what to decompose.
            should_stop: polled between layers and chunks; when it returns True the work
                stops with :class:`engine.Cancelled` (a deadline passed, a client left).

        Raises:
            RequestError: the request does not fit the model (names the field).
            MemoryBudgetError: its memory estimate is over the budget (nothing ran).
            Cancelled: ``should_stop`` said so.
        """
        return self.attribute_many([request], should_stop)[0]

    def attribute_many(
        self,
        requests: Sequence[AttributionRequest],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[AttributionResult]:
        """Decompose several requests; small compatible ones run as one padded batch.

        Requests with the same settings (granularity, start and end layers, split rule,
        temperature, first-token rule, layer snapshots) and at most ``batch_max_cells``
        components x tokens each are stacked, up to ``max_batch`` at a time and within the
        memory budget, and propagated together: one matrix product per step serves them
        all. Shorter prompts are padded with zero positions and fewer components with zero
        rows, which stay exactly zero, so every result equals the one ``attribute`` gives
        alone (up to float rounding). Results come back in the order asked.

        Raises: as :meth:`attribute`, for the first request that fails.
        """
        plans = [self.plan(request) for request in requests]
        outcomes: dict[tuple[int, int], _RunOutcome] = {}
        batches = self._batches(requests, plans)
        # The forward pass of a prompt serves all of its runs (start layers) in this call,
        # cache or no cache; it is let go after the last batch that needs it.
        uses = Counter(tuple(plans[i].input_ids) for batch in batches for i, _ in batch)
        held: dict[tuple[int, ...], ForwardTrace] = {}
        with torch.inference_mode():
            for batch in batches:
                outcomes.update(self._run_batch(requests, plans, batch, should_stop, held))
                for i, _ in batch:
                    key = tuple(plans[i].input_ids)
                    uses[key] -= 1
                    if not uses[key]:
                        held.pop(key, None)
            return [
                self._result(request, plan, outcomes, i)
                for i, (request, plan) in enumerate(zip(requests, plans, strict=True))
            ]

    def _batches(
        self, requests: Sequence[AttributionRequest], plans: Sequence[Plan]
    ) -> list[list[tuple[int, int]]]:
        """Runs ``(request index, start layer)`` grouped into batches, in request order."""
        batches: list[list[tuple[int, int]]] = []
        open_batches: dict[tuple, list[tuple[int, int]]] = {}
        for i, (request, plan) in enumerate(zip(requests, plans, strict=True)):
            for layer in plan.layers:
                unit = (i, layer)
                if plan.cells > self.batch_max_cells or self.max_batch < 2:
                    batches.append([unit])
                    continue
                key = _batch_key(request, plan, layer)
                batch = open_batches.get(key)
                if batch is not None and len(batch) < self.max_batch:
                    memory, _ = self._batch_memory(plans, [*batch, unit])
                    if memory.total <= self.memory_budget_bytes:
                        batch.append(unit)
                        continue
                batch = [unit]
                open_batches[key] = batch
                batches.append(batch)
        return batches

    def _batch_memory(
        self, plans: Sequence[Plan], batch: list[tuple[int, int]]
    ) -> tuple[MemoryEstimate, int]:
        """The memory estimate of a batch of runs (padded to its largest member) and the
        budget it leaves for chunks."""
        if len(batch) == 1:
            plan = plans[batch[0][0]]
            return plan.memory, plan.chunk_budget
        members = [plans[i] for i, _ in batch]
        return estimate(
            self.shape,
            rows=max(p.components for p in members) + 1,
            length=max(p.num_tokens for p in members),
            positions=max(len(p.positions) for p in members),
            snapshots=max(p.snapshots for p in members),
            targets=max(p.targets for p in members),
            members=len(members),
            late_starts=all(p.late_starts for p in members),
            budget_bytes=self.memory_budget_bytes,
        )

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
            held.update(zip(missing, self.trace_many(missing), strict=True))
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
            start = kind.start(RunStart(self, requests[i], trace, layer, plans[i].groups))
            positions = torch.tensor(plans[i].positions, dtype=torch.long)
            members.append(Member(start=start, length=trace.num_tokens, positions=positions))
        labels = [member.start.labels for member in members]
        split = SplitSettings(
            rule=lead.mlp_split,
            temperature=lead.temperature,
            first_token_rule=lead.first_token_rule,
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
                self.compute_dtype,
                chunk_budget,
                should_stop,
                self.matmul_dtype,
                fused_split=self.compile,
            )
            propagator.check()
            propagator.run([members[k] for k in indices], split, end, lead.all_layers)
        outcomes: dict[tuple[int, int], _RunOutcome] = {}
        for k, ((i, _), member, trace) in enumerate(zip(batch, members, traces, strict=True)):
            request, plan = requests[i], plans[i]
            if plan.target_ids is None:  # each position's own top-1 next token
                tops = self.readout.top_tokens(trace, member.positions)
                targets = [[token] for token in tops]
                head = self.readout.for_position_targets(targets)
            else:
                targets = [list(plan.target_ids)] * len(plan.positions)
                head = self.readout.for_targets(plan.target_ids)
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
            # head runs over several layers: layer-free labels, and each layer's own
            components=head_labels(None, self.info.num_heads) if differ else per_layer[0],
            layer_components=per_layer if differ else None,
            first_positions=runs[-1].first_positions,
            position_targets=targets,
            position_target_tokens=[self.token_texts(row) for row in targets],
        )
        texts = self.token_texts(plan.input_ids)
        result = assemble(
            request,
            labels,
            views,
            axis,
            plan.end,
            plan.positions,
            texts,
            plan.input_ids,
            softcap=self.info.logit_softcap,
        )
        result.timings = {
            "forward_s": sum(run.timings["forward_s"] for run in runs),
            "decompose_s": sum(run.timings["decompose_s"] for run in runs),
            "batch_size": float(max(run.batch_size for run in runs)),
        }
        return result

    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        if not ids:
            raise RequestError(field, "tokenizes to no tokens")
        bad = [i for i in ids if not 0 <= i < self.info.vocab_size]
        if bad:
            raise RequestError(
                field, f"token ids {bad[:5]} are outside the vocabulary [0, {self.info.vocab_size})"
            )

    def _check_layers(
        self, kind: Granularity, request: AttributionRequest, layers: list[int]
    ) -> int:
        """Validate start layers; return the end layer (``L`` for the model output)."""
        n_layers = self.info.num_layers
        allowed = kind.start_layers(n_layers)
        for layer in layers:
            if layer not in allowed:
                raise RequestError(
                    "start_layer", f"{layer} is outside [0, {allowed[-1]}] for this model"
                )
        end = n_layers if request.end_layer is None else request.end_layer
        lowest = kind.lowest_end(max(layers))
        if not lowest <= end <= n_layers:
            raise RequestError(
                "end_layer", f"{end} is outside [{lowest}, {n_layers}] for this request"
            )
        return end

    def neuron_width(self, layer: int) -> int:
        """Neurons of ``layer``'s MLP (a mixture's: every expert's, then the shared one's)."""
        module = self.family.layer(self.model, layer)
        return self.family.mlp.for_layer(module).width(module)


@dataclass
class _RunOutcome:
    """What one run (a request at one start layer) leaves for its result."""

    labels: list[str]
    first_positions: list[int]  # (M,) in the labels' order
    targets: list[list[int]]  # (P, T) each kept position's scored ids
    views: list[View]
    batch_size: int  # runs propagated together with this one (1: alone)
    timings: dict[str, float]


def _batch_key(request: AttributionRequest, plan: Plan, layer: int) -> tuple:
    """Runs with equal keys may share a batch: the same start stage, end, split and
    snapshots (their start facts are compared again once the starts are built)."""
    return (
        layer,
        plan.end,
        request.granularity,
        request.module,
        request.mlp_split,
        request.temperature,
        request.first_token_rule,
        request.all_layers,
        request.end_layer is None,
    )


def _normalise_positions(values: Sequence[int] | None, length: int, field: str) -> list[int]:
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


def _require_eager(model: nn.Module) -> None:
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if implementation != "eager":
        raise ValueError(
            f"the model uses {implementation!r} attention, which returns no probabilities; "
            "load it with attn_implementation='eager' (DePassEngine.from_pretrained does)"
        )
