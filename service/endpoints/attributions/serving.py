"""Serving ``POST /v1/attributions``: the body becomes the engine's request, is sized with
:meth:`engine.DePassEngine.plan` before it is queued, runs on the worker (batched with
other small ones), and its result becomes the response, field for field."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from starlette.responses import Response

from engine import AttributionRequest, AttributionResult, RequestError
from engine.granularity import GRANULARITY_KINDS
from service.arrays import ArrayDecodeError, decode_array
from service.endpoints.attributions.protocol import AttributionBody, AttributionResponse
from service.errors import InvalidFieldError, PayloadTooLargeError
from service.serving import ELEMENT_BYTES, Disconnected, Payload, Serving, as_numpy, field_error
from service.worker import Batchable

#: The array fields of an attribution result (absent ones are left out of a response).
RESULT_ARRAYS = tuple(
    f.name for f in dataclasses.fields(AttributionResult) if "Tensor" in str(f.type)
)


class AttributionServing(Serving):
    """``POST /v1/attributions``."""

    async def attribute(
        self, body: AttributionBody, accept: str | None, is_disconnected: Disconnected | None
    ) -> Response | BaseModel:
        """Size the request, run it on the worker, render its result."""
        clock = time.perf_counter()
        request = self.engine_request(body)
        # The input limit first: a request over it gets that answer, whatever else it asks.
        await self.input_ids(body)
        plan = await self.call(self.engine.plan, request)
        estimate = plan.result_bytes(ELEMENT_BYTES[body.array_dtype])
        if estimate > self.settings.max_response_bytes:
            raise PayloadTooLargeError(
                _response_too_large(estimate, self.settings.max_response_bytes, body),
                code="response_too_large",
            )
        # what cannot finish within the timeout is refused now, not after holding the worker
        await self.check_time(plan, body)
        self.metrics.input_tokens.labels("attribute").observe(plan.num_tokens)
        small = plan.cells <= self.engine.batch_max_cells and self.settings.max_batch > 1
        done = await self.submit(
            "attribute",
            lambda stop: self.engine.attribute(request, should_stop=stop),
            is_disconnected=is_disconnected,
            batch=Batchable("attribute", request) if small else None,
        )
        self.metrics.queue_wait.observe(done.queue_s)
        result: AttributionResult = done.value
        timings = {"queue_s": done.queue_s, **result.timings}
        timings["total_s"] = time.perf_counter() - clock
        return self.render(self.payload(result, timings), body, accept, AttributionResponse)

    def engine_request(self, body: AttributionBody) -> AttributionRequest:
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

    def payload(self, result: AttributionResult, timings: dict[str, float]) -> Payload:
        """The response of a result: every field of the engine's result (tensors as
        arrays), the model's name, and the service's timings."""
        fields: dict[str, Any] = {"model": self.model_name}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            if isinstance(value, torch.Tensor):
                arrays[f.name] = as_numpy(value)
            elif value is not None or f.name not in RESULT_ARRAYS:
                fields[f.name] = value
        fields["timings"] = timings
        return Payload(fields, arrays)


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
