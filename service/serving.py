"""The serving layer's shared base: HTTP bodies in, engine calls on the worker, HTTP
bodies out.

:class:`Serving` holds what every endpoint shares (the engine, settings, metrics, the
worker) and the steps they share: input limits, sizing, running a job on the worker,
rendering arrays; each endpoint's ``serving.py`` (:mod:`service.endpoints`) subclasses it
with its own method. Every request is converted to the engine's own
:class:`engine.AttributionRequest` and sized with :meth:`engine.DePassEngine.plan`
*before* it is queued, so that a request over a limit costs no model work. Engine calls
run on the single :class:`service.worker.Worker` and poll its ``should_stop``: a request
past its deadline, or whose client left, stops between layers and frees the worker. An
out-of-memory error frees the trace cache and the allocator's cache and answers 503; the
service keeps serving.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.numpy import save as save_safetensors
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from engine import (
    AttributionRequest,
    AttributionResult,
    DePassEngine,
    MemoryBudgetError,
    Plan,
    RequestError,
    TimeBudgetError,
)
from engine.loading import resolve_dtype
from service.arrays import encode_array
from service.errors import (
    InvalidFieldError,
    NonFiniteResultError,
    OutOfMemoryError,
    PayloadTooLargeError,
)
from service.metrics import Metrics
from service.protocol import SAFETENSORS_MEDIA_TYPE, SAFETENSORS_METADATA_KEY, ArrayOptions
from service.settings import Settings, input_limit
from service.worker import Batchable, Done, StopCheck, Worker

logger = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S", bound="Serving")

#: Called on the worker thread with the operation name before each engine call: a test
#: seam to inject faults (an out-of-memory error, a slow job) without a GPU.
FaultInjector = Callable[[str], None]
Disconnected = Callable[[], Awaitable[bool]]

ELEMENT_BYTES = {"float32": 4, "float16": 2}
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
    matmul: str | None = settings.matmul_dtype
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


class TextBody(Protocol):
    """A body with a text input (chat bodies also have ``messages``)."""

    @property
    def prompt(self) -> str | None: ...


class InputBody(TextBody, Protocol):
    """A body with a text or token-id input."""

    @property
    def input_ids(self) -> list[int] | None: ...


@dataclass
class Payload:
    """A response before rendering: JSON fields and named arrays."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]


class Serving:
    """Serves one engine: what every endpoint shares (validation, sizing, the worker,
    rendering). The app keeps one on ``app.state.serving``; each endpoint's subclass is
    built from it once, by :meth:`endpoint`, and shares its engine, worker and metrics.

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
        self._endpoints: dict[type[Serving], Serving] = {}

    def endpoint(self, kind: type[S]) -> S:
        """The serving layer of one endpoint (a subclass), built on first use."""
        if kind not in self._endpoints:
            self._endpoints[kind] = kind(
                self.engine, self.settings, self.metrics, self.worker, self.fault_injector
            )
        serving = self._endpoints[kind]
        assert isinstance(serving, kind)
        return serving

    # ------------------------------------------------------------------ requests

    async def input_ids(self, body: InputBody, extra_tokens: int = 0) -> list[int]:
        """The token ids of a body's input, held to the input limit (with ``extra_tokens``
        more to come) before anything else is checked or sized."""
        self.check_input_chars(body)
        if body.input_ids is not None:  # the limit before the vocabulary
            self.check_input_length(len(body.input_ids) + extra_tokens, "input_ids")
        given = getattr(body, "messages", None)  # bodies without chat input have no field
        messages = None if given is None else [m.model_dump() for m in given]
        ids, field = await self.call(self.engine.input_ids, body.prompt, body.input_ids, messages)
        self.check_input_length(len(ids) + extra_tokens, field)
        return ids

    def check_input_chars(self, body: TextBody) -> None:
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

    async def check_time(self, plan: Plan, body: InputBody) -> None:
        """413 ``time_budget`` (naming the input field) for a planned request whose
        estimated compute time is over ``DEPASS_REQUEST_TIMEOUT_S``."""
        field = next(name for name in ("input_ids", "messages", "prompt") if getattr(body, name))
        await self.call(self.engine.check_time, plan, self.settings.request_timeout_s, field)

    def check_input_length(self, tokens: int, field: str) -> None:
        """413 for an input of more tokens than the service takes."""
        limit = self.max_input_tokens
        if tokens > limit:
            raise PayloadTooLargeError(
                f"{field}: the input is {tokens} tokens, over this service's limit of {limit}",
                param=field,
                code="input_too_long",
            )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A cheap engine call (tokenizing, planning) on the thread pool, errors mapped."""
        try:
            return await run_in_threadpool(fn, *args)
        except RequestError as exc:
            raise field_error(exc) from None

    # ------------------------------------------------------------------ worker side

    async def submit(
        self,
        operation: str,
        job: Callable[[StopCheck], T],
        *,
        is_disconnected: Disconnected | None = None,
        batch: Batchable | None = None,
    ) -> Done[T]:
        """Run ``job`` on the worker (guarded, under the request timeout); ``batch``: it may
        run together with other queued attributions (:meth:`attribute_batch`)."""
        return await self.worker.submit(
            lambda stop: self.guarded(operation, lambda: job(stop)),
            timeout_s=self.settings.request_timeout_s,
            is_disconnected=is_disconnected,
            batch=batch,
        )

    def attribute_batch(
        self, requests: list[AttributionRequest], should_stop: StopCheck
    ) -> list[AttributionResult]:
        """The worker's batch runner: several queued attribution requests in one engine
        call (each result equals the one its request gets alone)."""
        self.metrics.batch_size.observe(len(requests))
        return self.guarded(
            "attribute", lambda: self.engine.attribute_many(requests, should_stop=should_stop)
        )

    def guarded(self, operation: str, job: Callable[[], T]) -> T:
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
        self.free_memory()
        self.metrics.out_of_memory.inc()
        logger.warning("out of memory during %s; caches freed", operation)
        raise OutOfMemoryError(
            "the model ran out of memory on this request; caches were freed. Ask for less: "
            "fewer positions, outputs=['scores'], a shorter input"
        )

    def free_memory(self) -> None:
        """Free the trace cache and the allocator's cache (after an out-of-memory error)."""
        self.engine.clear_cache()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ responses

    def render(
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


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float32 array of ``tensor``."""
    return tensor.detach().to("cpu", torch.float32).numpy()
