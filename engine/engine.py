"""DePassEngine: load a causal LM once, answer attribution requests on it.

The engine holds the model and what serves every request (its family's parts, the
trace cache, the read-out, the memory budget) and runs requests: :meth:`DePassEngine.plan`
checks and sizes one (each granularity's object in :mod:`engine.granularity` says what
its components are), :meth:`DePassEngine.attribute_many` schedules the runs into batches
(:mod:`engine.plan`), starts and propagates them (:mod:`engine.propagate`) and assembles
the results (:mod:`engine.readout`). Loading is :mod:`engine.loading`, token handling
:mod:`engine.tokens`, the model's facts :mod:`engine.info`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.capture import ForwardTrace
from engine.cost import Rates, TimeBudgetError, fitting, measure_rates, plan_work, seconds
from engine.families import Family, family_for
from engine.granularity import GRANULARITY_KINDS, Granularity
from engine.info import model_info
from engine.loading import load_pretrained
from engine.memory import (
    MemoryBudgetError,
    Shape,
    auto_budget_bytes,
    estimate,
    reverse_estimate,
)
from engine.plan import (
    Plan,
    normalise_positions,
    reverse_is_cheaper,
)
from engine.readout import FrozenReadout
from engine.request import AttributionRequest, RequestError, RunStrategy
from engine.result import AttributionResult
from engine.runner import BatchRunner
from engine.tokens import Tokens
from engine.trace_cache import TraceCache
from engine.view import ModelView


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
        self.info = model_info(self.model, self.family)
        bos = getattr(model.config, "bos_token_id", None)
        self.tokens = Tokens(tokenizer, self.info.vocab_size, bos if isinstance(bos, int) else None)
        self.readout = FrozenReadout(
            final_norm=self.family.final_norm_module(self.model),
            unembed=self.family.unembed(self.model),
            norm=self.family.final_norm,
            dtype=compute_dtype,
            softcap=self.info.logit_softcap,
        )
        self.shape = Shape.of(
            self.info, self.family, self.model, self.compute_dtype, self.matmul_dtype
        )
        self.view = ModelView(
            info=self.info,
            shape=self.shape,
            compute_dtype=compute_dtype,
            matmul_dtype=self.matmul_dtype,
            _model=self.model,
            _family=self.family,
            _tokens=self.tokens,
        )
        self._rates: Rates | None = None

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
        model, tokenizer = load_pretrained(
            path_or_id,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            gguf_file=gguf_file,
            gguf_cache_dir=gguf_cache_dir,
        )
        return cls(model, tokenizer, **engine_kwargs)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (special tokens included)."""
        return self.tokens.tokenize(prompt)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat in the tokenizer's chat template, generation prompt added."""
        return self.tokens.chat_ids(messages)

    def input_ids(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> tuple[list[int], str]:
        """The checked token ids of a request's input and the field that gave them
        (:meth:`engine.tokens.Tokens.input_ids`)."""
        return self.tokens.input_ids(prompt, input_ids, messages)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each token."""
        return self.tokens.texts(ids)

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
        positions = normalise_positions(request.positions, length, "positions")
        layers = request.start_layers
        kind = GRANULARITY_KINDS[request.granularity]
        end = self._check_layers(kind, request, layers)
        groups = None
        if request.groups is not None:
            groups = [normalise_positions(g, length, "groups") for g in request.groups]
        info = self.info
        count = kind.count(self.view, request, length, groups)
        snapshots = end - layers[0] + 1 if request.all_layers else len(layers)
        target_ids = None if request.targets is None else self.tokens.targets(request.targets)
        first_token_rule = request.applied_first_token_rule(
            self.tokens.starts_with_special(input_ids)
        )
        memory, chunk_budget = estimate(
            self.shape,
            rows=count + 1,
            length=length,
            positions=len(positions),
            snapshots=snapshots,
            targets=1 if target_ids is None else len(target_ids),
            start_extra=kind.start_bytes(self.view, count, length),
            late_starts=kind.late_starts(count),
            budget_bytes=self.memory_budget_bytes,
        )
        stages = [kind.start_stage(layer, request) for layer in layers]
        targets = 1 if target_ids is None else len(target_ids)
        scored = len(positions) * targets  # one cotangent each in a reverse pass
        strategy = self._strategy(request, count, stages, end, scored)
        light = False
        if strategy == "reverse":
            reverse_memory = functools.partial(
                reverse_estimate,
                self.shape,
                length=length,
                stages=2 * end - min(stages),
                kept_stages=len(set(stages)),
                scored=scored,
                # token and neuron runs score without building their (M + 1, N, D) start
                start_rows=1 if request.granularity in ("token", "neuron") else count + 1,
                result_rows=count + 1,
                positions=len(positions),
                targets=targets,
                runs=len(layers),
            )
            memory = reverse_memory(light_trace=False)
            if memory.total > self.memory_budget_bytes:  # recompute probabilities per layer
                light, memory = True, reverse_memory(light_trace=True)
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
            strategy=strategy,
            light_trace=light,
            first_token_rule=first_token_rule,
        )

    def _strategy(
        self,
        request: AttributionRequest,
        count: int,
        stages: list[int],
        end: int,
        scored: int,
    ) -> RunStrategy:
        """``forward`` or ``reverse`` for this request (``auto``: reverse when it applies
        and :func:`engine.plan.reverse_is_cheaper`)."""
        if request.strategy != "auto":
            return request.strategy
        if request.reverse_refusal is not None:
            return "forward"
        cheaper = reverse_is_cheaper(count + 1, stages, 2 * end, scored)
        return "reverse" if cheaper else "forward"

    # ------------------------------------------------------------------ time

    def rates(self) -> Rates:
        """The device's measured rates (:func:`engine.cost.measure_rates`, a few
        milliseconds, once; a service measures them at start-up)."""
        if self._rates is None:
            device = next(self.model.parameters()).device
            self._rates = measure_rates(device, self.matmul_dtype)
        return self._rates

    def estimate_seconds(self, plan: Plan) -> float:
        """Estimated seconds of a planned request on this device (:mod:`engine.cost`)."""
        return seconds(plan_work(self.shape, plan), self.rates())

    def check_time(self, plan: Plan, budget_s: float, field: str = "prompt") -> float:
        """The estimate of ``plan``, or :class:`engine.cost.TimeBudgetError` (naming
        ``field``, with what would fit) when it is over ``budget_s``."""
        estimate_s = self.estimate_seconds(plan)
        if estimate_s > budget_s:
            hints = fitting(self.shape, plan, self.rates(), budget_s)
            raise TimeBudgetError(field, estimate_s, budget_s, hints)
        return estimate_s

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
        return self._runner().run(requests, plans, should_stop)

    def _runner(self) -> BatchRunner:
        """The batch runner on this engine's model, parts and settings."""
        return BatchRunner(
            model=self.model,
            family=self.family,
            view=self.view,
            readout=self.readout,
            traces=self.traces,
            memory_budget_bytes=self.memory_budget_bytes,
            max_batch=self.max_batch,
            batch_max_cells=self.batch_max_cells,
            compile=self.compile,
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
        return self.view.neuron_width(layer)


def _require_eager(model: nn.Module) -> None:
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if implementation != "eager":
        raise ValueError(
            f"the model uses {implementation!r} attention, which returns no probabilities; "
            "load it with attn_implementation='eager' (DePassEngine.from_pretrained does)"
        )
