"""The serving layer: HTTP bodies in, engine calls on the worker, HTTP bodies out.

Every request is converted to the engine's own :class:`engine.AttributionRequest` and
sized with :meth:`engine.DePassEngine.plan` *before* it is queued, so that a request over
a limit costs no model work. Engine calls run on the single :class:`service.worker.Worker`
and poll its ``should_stop``: a request past its deadline, or whose client left, stops
between layers and frees the worker. An out-of-memory error frees the trace cache and the
allocator's cache and answers 503; the service keeps serving.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.numpy import save as save_safetensors
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from engine import (
    SPLIT_RULES,
    AttributionRequest,
    AttributionResult,
    DePassEngine,
    MemoryBudgetError,
    Plan,
    RequestError,
    TimeBudgetError,
)
from engine.granularity import GRANULARITY_KINDS
from engine.loading import resolve_dtype
from engine.request import GRANULARITIES
from service.arrays import ENCODINGS, ArrayDecodeError, decode_array, encode_array
from service.errors import (
    InvalidFieldError,
    NonFiniteResultError,
    OutOfMemoryError,
    PayloadTooLargeError,
)
from service.generation import Continuation, continue_ids, eos_token_ids, top_next_tokens
from service.metrics import Metrics
from service.protocol import (
    SAFETENSORS_MEDIA_TYPE,
    SAFETENSORS_METADATA_KEY,
    ArrayOptions,
    AttributionBody,
    AttributionResponse,
    GenerateBody,
    GenerateResponse,
    Limits,
    ModelResponse,
    NextToken,
    NextTokensBody,
    NextTokensResponse,
    TokenizeBody,
    TokenizeResponse,
)
from service.settings import Settings, input_limit
from service.worker import Batchable, StopCheck, Worker

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Called on the worker thread with the operation name before each engine call: a test
#: seam to inject faults (an out-of-memory error, a slow job) without a GPU.
FaultInjector = Callable[[str], None]
Disconnected = Callable[[], Awaitable[bool]]

ELEMENT_BYTES = {"float32": 4, "float16": 2}
#: The array fields of an attribution result (absent ones are left out of a response).
RESULT_ARRAYS = (
    "scores",
    "remainder_scores",
    "states",
    "remainder",
    "logits",
    "capped_logits",
)
#: A prompt longer than ``max_input_tokens`` times this many characters is refused (413)
#: before it is tokenized: no tokenizer has tokens this long, and tokenizing megabytes of
#: text would cost seconds of CPU for a request that is refused anyway.
MAX_CHARS_PER_TOKEN = 256


def load_engine(settings: Settings) -> DePassEngine:
    """Load the configured model once, on the configured device and dtype."""
    settings.check_model_source()
    device = settings.resolved_device()
    where = f"device map {settings.device_map!r}" if settings.device_map else device
    logger.info("loading %s on %s (dtype %s)", settings.model, where, settings.dtype)
    weights = resolve_dtype(settings.dtype, device)
    matmul = settings.matmul_dtype
    if matmul == "auto":
        sixteen_bit = weights in (torch.bfloat16, torch.float16)
        on_cuda = device.startswith("cuda") or settings.device_map is not None
        matmul = str(weights).removeprefix("torch.") if sixteen_bit and on_cuda else None
    return DePassEngine.from_pretrained(
        settings.model,
        device=device,
        dtype=weights,
        device_map=settings.device_map,
        trust_remote_code=settings.trust_remote_code,
        gguf_cache_dir=settings.gguf_cache_dir,
        compute_dtype=getattr(torch, settings.compute_dtype),
        matmul_dtype=None if matmul is None else getattr(torch, matmul),
        memory_budget_bytes=settings.memory_budget_bytes,
        trace_cache_size=settings.trace_cache_size,
        trace_cache_bytes=settings.trace_cache_bytes,
        max_batch=settings.max_batch,
        batch_max_cells=settings.batch_max_cells,
        compile=settings.compile,
    )


def field_error(exc: RequestError) -> InvalidFieldError | PayloadTooLargeError:
    """The HTTP error for an engine request error: 413 (with the estimate) for a request
    over the memory budget or the time limit, 422 naming the field otherwise."""
    if isinstance(exc, MemoryBudgetError):
        return PayloadTooLargeError(str(exc), param=exc.field, code="memory_budget")
    if isinstance(exc, TimeBudgetError):
        return PayloadTooLargeError(str(exc), param=exc.field, code="time_budget")
    return InvalidFieldError(str(exc), param=exc.field)


def wants_safetensors(accept: str | None) -> bool:
    """Whether the ``Accept`` header asks for the binary (safetensors) response."""
    if not accept:
        return False
    for item in accept.split(","):
        media, _, params = item.partition(";")
        if media.strip().lower() == SAFETENSORS_MEDIA_TYPE:
            return "q=0" not in params.replace(" ", "").split(";")
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA/MPS/CPU allocation failure, whatever torch calls it."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


@dataclass
class Payload:
    """A response before rendering: JSON fields and named arrays."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]


class Serving:
    """Serves one engine: validation, sizing, the worker, conversion and rendering.

    Args:
        fault_injector: see :data:`FaultInjector`.
    """

    def __init__(
        self,
        engine: DePassEngine,
        settings: Settings,
        metrics: Metrics,
        worker: Worker,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.worker = worker
        self.fault_injector = fault_injector
        self.model_name = settings.model_name()
        positions = getattr(engine.model.config, "max_position_embeddings", None)
        #: The longest input served (DEPASS_MAX_INPUT_TOKENS, else the model's positions).
        self.max_input_tokens = input_limit(
            settings.max_input_tokens, positions if isinstance(positions, int) else None
        )
        self._stop_ids = eos_token_ids(engine.model, engine.tokenizer)

    # ------------------------------------------------------------------ endpoints

    async def attribute(
        self, body: AttributionBody, accept: str | None, is_disconnected: Disconnected | None
    ) -> Response | BaseModel:
        """``POST /v1/attributions``."""
        clock = time.perf_counter()
        request = self._engine_request(body)
        # The input limit first: a request over it gets that answer, whatever else it asks.
        await self._input_ids(body)
        plan = await self._call(self.engine.plan, request)
        estimate = plan.result_bytes(ELEMENT_BYTES[body.array_dtype])
        if estimate > self.settings.max_response_bytes:
            raise PayloadTooLargeError(
                _response_too_large(estimate, self.settings.max_response_bytes, body),
                code="response_too_large",
            )
        # what cannot finish within the timeout is refused now, not after holding the worker
        await self._check_time(plan, body)
        self.metrics.input_tokens.labels("attribute").observe(plan.num_tokens)
        small = plan.cells <= self.engine.batch_max_cells and self.settings.max_batch > 1
        done = await self.worker.submit(
            lambda stop: self._guarded(
                "attribute", lambda: self.engine.attribute(request, should_stop=stop)
            ),
            timeout_s=self.settings.request_timeout_s,
            is_disconnected=is_disconnected,
            batch=Batchable("attribute", request) if small else None,
        )
        self.metrics.queue_wait.observe(done.queue_s)
        result: AttributionResult = done.value
        timings = {"queue_s": done.queue_s, **result.timings}
        timings["total_s"] = time.perf_counter() - clock
        payload = self._attribution_payload(result, timings)
        return self._render(payload, body, accept, AttributionResponse)

    async def generate(
        self, body: GenerateBody, accept: str | None, is_disconnected: Disconnected | None
    ) -> Response | BaseModel:
        """``POST /v1/generate``."""
        clock = time.perf_counter()
        limit = self.settings.max_new_tokens
        if body.max_new_tokens > limit:
            raise InvalidFieldError(
                f"max_new_tokens: {body.max_new_tokens} is over this service's limit of {limit}",
                param="max_new_tokens",
            )
        prompt_ids = await self._input_ids(body, extra_tokens=body.max_new_tokens - 1)
        # the attribution of every generated token, sized at the most tokens it can have
        longest = AttributionRequest(
            input_ids=prompt_ids + prompt_ids[-1:] * (body.max_new_tokens - 1),
            positions=[-1],
            ignore_bos=body.ignore_bos,
        )
        await self._check_time(await self._call(self.engine.plan, longest), body)
        self.metrics.input_tokens.labels("generate").observe(len(prompt_ids))
        done = await self.worker.submit(
            lambda stop: self._guarded(
                "generate", lambda: self._generate_job(body, prompt_ids, stop)
            ),
            timeout_s=self.settings.request_timeout_s,
            is_disconnected=is_disconnected,
        )
        self.metrics.queue_wait.observe(done.queue_s)
        continuation, result, generate_s = done.value
        timings = {"queue_s": done.queue_s, "generate_s": generate_s, **result.timings}
        timings["total_s"] = time.perf_counter() - clock
        payload = self._generation_payload(prompt_ids, continuation, result, timings)
        return self._render(payload, body, accept, GenerateResponse)

    async def tokenize(self, body: TokenizeBody) -> TokenizeResponse:
        """``POST /v1/tokenize``."""
        self._check_input_chars(body)
        ids = await self._call(self.engine.tokenize, body.prompt)
        tokens = await self._call(self.engine.token_texts, ids)
        return TokenizeResponse(input_ids=ids, tokens=tokens, num_tokens=len(ids))

    async def next_tokens(self, body: NextTokensBody) -> NextTokensResponse:
        """``POST /v1/next_tokens``: one forward pass, the ``top_k`` logits at each position."""
        ids = await self._input_ids(body)
        positions = []
        for position in body.positions:
            if not -len(ids) <= position < len(ids):
                raise InvalidFieldError(
                    f"positions: {position} is outside the input's {len(ids)} tokens",
                    param="positions",
                )
            positions.append(position % len(ids))
        model, k = self.engine.model, body.top_k
        done = await self.worker.submit(
            lambda stop: self._guarded(
                "next_tokens", lambda: top_next_tokens(model, ids, positions, k)
            ),
            timeout_s=self.settings.request_timeout_s,
        )
        logits, probs, top_ids = done.value
        texts = self.engine.token_texts(ids)
        predictions = [
            [
                NextToken(id=i, token=t, logit=float(logit), probability=float(p))
                for i, t, logit, p in zip(
                    row, self.engine.token_texts(row), logits[r], probs[r], strict=True
                )
            ]
            for r, row in enumerate(top_ids)
        ]
        return NextTokensResponse(
            model=self.model_name,
            tokens=texts,
            input_ids=ids,
            positions=positions,
            predictions=predictions,
        )

    def model_card(self) -> ModelResponse:
        """``GET /v1/model``."""
        s = self.settings
        return ModelResponse(
            **dataclasses.asdict(self.engine.info),
            id=self.model_name,
            compute_dtype=str(self.engine.compute_dtype).removeprefix("torch."),
            granularities=list(GRANULARITIES),
            mlp_splits=list(SPLIT_RULES),
            array_encodings=["auto", *ENCODINGS],
            auth_required=s.api_key is not None,
            limits=Limits(
                max_input_tokens=self.max_input_tokens,
                max_new_tokens=s.max_new_tokens,
                max_queue=s.max_queue,
                request_timeout_s=s.request_timeout_s,
                max_response_bytes=s.max_response_bytes,
                max_body_bytes=s.max_body_bytes,
                memory_budget_bytes=self.engine.memory_budget_bytes,
                trace_cache_size=self.engine.traces.size,
                trace_cache_bytes=self.engine.traces.max_bytes,
            ),
        )

    # ------------------------------------------------------------------ requests

    async def _input_ids(
        self, body: AttributionBody | GenerateBody | NextTokensBody, extra_tokens: int = 0
    ) -> list[int]:
        """The token ids of a body's input, held to the input limit (with ``extra_tokens``
        more to come) before anything else is checked or sized."""
        self._check_input_chars(body)
        if body.input_ids is not None:  # the limit before the vocabulary
            self._check_input_length(len(body.input_ids) + extra_tokens, "input_ids")
        given = getattr(body, "messages", None)  # bodies without chat input have no field
        messages = None if given is None else [m.model_dump() for m in given]
        ids, field = await self._call(self.engine.input_ids, body.prompt, body.input_ids, messages)
        self._check_input_length(len(ids) + extra_tokens, field)
        return ids

    def _engine_request(self, body: AttributionBody) -> AttributionRequest:
        """The engine's request: ``subspace`` decoded (never unpickled), fields re-checked."""
        fields = body.model_dump(exclude={"array_encoding", "array_dtype", "subspace"})
        if body.subspace is not None:
            try:
                fields["subspace"] = decode_array(
                    dtype=body.subspace.dtype,
                    shape=body.subspace.shape,
                    encoding=body.subspace.encoding,
                    data=body.subspace.data,
                    max_bytes=self.settings.max_response_bytes,
                )
            except ArrayDecodeError as exc:
                raise InvalidFieldError(f"subspace: {exc}", param="subspace") from None
        try:
            return AttributionRequest(**fields)
        except RequestError as exc:
            raise field_error(exc) from None

    def _check_input_chars(
        self, body: AttributionBody | GenerateBody | TokenizeBody | NextTokensBody
    ) -> None:
        """413 for a prompt (or chat) too long to fit the token limit, before tokenizing it."""
        limit = self.max_input_tokens * MAX_CHARS_PER_TOKEN
        messages = getattr(body, "messages", None) or []
        for field, size in (
            ("prompt", len(body.prompt or "")),
            ("messages", sum(len(m.content) for m in messages)),
        ):
            if size > limit:
                raise PayloadTooLargeError(
                    f"{field}: {size} characters cannot fit this service's limit of "
                    f"{self.max_input_tokens} tokens (at most {limit} characters)",
                    param=field,
                    code="input_too_long",
                )

    async def _check_time(self, plan: Plan, body: AttributionBody | GenerateBody) -> None:
        """413 ``time_budget`` (naming the input field) for a planned request whose
        estimated compute time is over ``DEPASS_REQUEST_TIMEOUT_S``."""
        field = next(name for name in ("input_ids", "messages", "prompt") if getattr(body, name))
        await self._call(self.engine.check_time, plan, self.settings.request_timeout_s, field)

    def _check_input_length(self, tokens: int, field: str) -> None:
        limit = self.max_input_tokens
        if tokens > limit:
            raise PayloadTooLargeError(
                f"{field}: the input is {tokens} tokens, over this service's limit of {limit}",
                param=field,
                code="input_too_long",
            )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """A cheap engine call (tokenizing, planning) on the thread pool, errors mapped."""
        try:
            return await run_in_threadpool(fn, *args)
        except RequestError as exc:
            raise field_error(exc) from None

    def attribute_batch(
        self, requests: list[AttributionRequest], should_stop: StopCheck
    ) -> list[AttributionResult]:
        """The worker's batch runner: several queued attribution requests in one engine
        call (each result equals the one its request gets alone)."""
        self.metrics.batch_size.observe(len(requests))
        return self._guarded(
            "attribute", lambda: self.engine.attribute_many(requests, should_stop=should_stop)
        )

    # ------------------------------------------------------------------ worker side

    def _guarded(self, operation: str, job: Callable[[], T]) -> T:
        """Run ``job`` on the worker thread; turn an out-of-memory error into a 503."""
        clock = time.perf_counter()
        try:
            if self.fault_injector is not None:
                self.fault_injector(operation)
            return job()
        except RequestError as exc:
            raise field_error(exc) from None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        finally:
            self.metrics.engine_duration.labels(operation).observe(time.perf_counter() - clock)
        # Only an out-of-memory error gets here; its traceback (and the tensors its frames
        # held) is gone now, so freeing the caches releases the memory.
        self._free_memory()
        self.metrics.out_of_memory.inc()
        logger.warning("out of memory during %s; caches freed", operation)
        raise OutOfMemoryError(
            "the model ran out of memory on this request; caches were freed. Ask for less: "
            "fewer positions, outputs=['scores'], a shorter input"
        )

    def _free_memory(self) -> None:
        self.engine.clear_cache()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _generate_job(
        self, body: GenerateBody, prompt_ids: list[int], should_stop: StopCheck
    ) -> tuple[Continuation, AttributionResult, float]:
        """Continue the prompt, then attribute every generated token in one engine call:
        positions are the ones before each generated token, targets the generated tokens."""
        clock = time.perf_counter()
        continuation = continue_ids(
            self.engine.model,
            prompt_ids,
            body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_ids=self._stop_ids if body.stop_at_eos else (),
            should_stop=should_stop,
        )
        generate_s = time.perf_counter() - clock
        generated = continuation.ids
        start = len(prompt_ids) - 1
        request = AttributionRequest(
            input_ids=prompt_ids + generated[:-1],
            granularity="token",
            positions=list(range(start, start + len(generated))),
            targets=list(generated),
            mlp_split=body.mlp_split,
            temperature=body.split_temperature,
            ignore_bos=body.ignore_bos,
            outputs=["scores"],
        )
        return continuation, self.engine.attribute(request, should_stop=should_stop), generate_s

    # ------------------------------------------------------------------ responses

    def _attribution_payload(self, result: AttributionResult, timings: dict[str, float]) -> Payload:
        """The response of a result: every field of the engine's result (tensors as
        arrays), the model's name, and the service's timings."""
        fields: dict[str, Any] = {"model": self.model_name}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            if isinstance(value, torch.Tensor):
                arrays[f.name] = _numpy(value)
            elif value is not None or f.name not in RESULT_ARRAYS:
                fields[f.name] = value
        fields["timings"] = timings
        return Payload(fields, arrays)

    def _generation_payload(
        self,
        prompt_ids: list[int],
        continuation: Continuation,
        result: AttributionResult,
        timings: dict[str, float],
    ) -> Payload:
        generated = continuation.ids
        g = np.arange(len(generated))
        assert result.scores is not None and result.remainder_scores is not None
        scores = _numpy(result.scores)[g, :, g]  # (G, M): position i scored on its own target
        tokenizer = self.engine.tokenizer
        texts = self.engine.token_texts(generated)
        text = (
            tokenizer.decode(generated, skip_special_tokens=True)
            if tokenizer is not None
            else "".join(texts)
        )
        fields = {
            "model": self.model_name,
            "text": text,
            "finish_reason": continuation.finish_reason,
            "seed": continuation.seed,
            "prompt_ids": prompt_ids,
            "prompt_tokens": self.engine.token_texts(prompt_ids),
            "generated_ids": generated,
            "generated_tokens": texts,
            "components": result.components,
            "positions": result.positions,
            "conservation_error": result.conservation_error,
            "relative_conservation_error": result.relative_conservation_error,
            "timings": timings,
        }
        arrays = {
            "scores": scores,
            "remainder_scores": _numpy(result.remainder_scores)[g, g],  # (G,)
            "logits": _numpy(result.logits)[g, g],  # (G,)
        }
        return Payload(fields, arrays)

    def _render(
        self,
        payload: Payload,
        options: ArrayOptions,
        accept: str | None,
        model: type[BaseModel],
    ) -> Response | BaseModel:
        """JSON with encoded arrays, or a safetensors file when the client asked for one."""
        require_finite(payload)
        if wants_safetensors(accept):
            dtype = np.dtype(options.array_dtype)
            tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in payload.arrays.items()}
            metadata = {SAFETENSORS_METADATA_KEY: json.dumps(payload.fields)}
            return Response(save_safetensors(tensors, metadata), media_type=SAFETENSORS_MEDIA_TYPE)
        encoded = {
            name: encode_array(array, options.array_encoding, options.array_dtype)
            for name, array in payload.arrays.items()
        }
        return model.model_validate({**payload.fields, **encoded})


def require_finite(payload: Payload) -> None:
    """422 when the result holds NaN or infinity: JSON cannot carry them, and they come
    from numerically extreme requests (a split temperature near zero, for example)."""
    fields = payload.fields.items()
    bad = [k for k, v in fields if isinstance(v, float) and not math.isfinite(v)]
    bad += [k for k, v in payload.arrays.items() if not np.isfinite(v).all()]
    if bad:
        raise NonFiniteResultError(
            f"the result holds NaN or infinity ({', '.join(bad)}): the request is "
            "numerically out of range; try another mlp_split or a larger temperature"
        )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float32 array of ``tensor``."""
    return tensor.detach().to("cpu", torch.float32).numpy()


def _response_too_large(estimate: int, limit: int, body: AttributionBody) -> str:
    """The 413 message: the estimate, the limit, and how to ask for less."""
    hints = []
    if body.positions is None:
        hints.append("fewer positions (e.g. positions=[-1] for the last token)")
    if "states" in body.outputs:
        hints.append("outputs=['scores'] (states are hidden_size times larger)")
    fewer = GRANULARITY_KINDS[body.granularity].smaller(body)
    if fewer is not None:
        hints.append(fewer)
    if body.array_dtype == "float32":
        hints.append("array_dtype='float16' (half the size)")
    return (
        f"the response would carry about {_human(estimate)} of arrays, over this service's "
        f"limit of {_human(limit)}; ask for less: " + "; ".join(hints or ["a shorter input"])
    )


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"
