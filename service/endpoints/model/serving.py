"""Serving ``GET /v1/model``: the engine's model facts and the limits in force."""

from __future__ import annotations

import dataclasses

from engine import SPLIT_RULES
from engine.request import GRANULARITIES
from service.arrays import ENCODINGS
from service.endpoints.model.protocol import Limits, ModelResponse
from service.serving import Serving


class ModelServing(Serving):
    """``GET /v1/model``."""

    def model_card(self) -> ModelResponse:
        """What is loaded and the limits in force."""
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
