"""The body of ``GET /v1/model``: the engine's model facts (derived from
:class:`engine.ModelInfo`) and the limits in force."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from engine.info import ModelInfo
from service.protocol import dataclass_fields, derived_model


class Limits(BaseModel):
    """The limits in force; requests over them get 413 or 422."""

    max_input_tokens: int
    max_new_tokens: int
    max_queue: int
    request_timeout_s: float
    max_response_bytes: int
    max_body_bytes: int
    memory_budget_bytes: int
    trace_cache_size: int
    trace_cache_bytes: int | None


#: The model facts of ``GET /v1/model``: the fields of :class:`engine.ModelInfo`.
ModelFacts: Any = derived_model("ModelFacts", dataclass_fields(ModelInfo, response=True))


class ModelResponse(ModelFacts):
    """``GET /v1/model``: what is loaded (the engine's model facts) and the limits in force."""

    object: Literal["model"] = "model"
    id: str = Field(description="Model name (hub id, or the folder name of a local model).")
    compute_dtype: str = Field(description="Dtype of the propagated components.")
    granularities: list[str]
    mlp_splits: list[str]
    array_encodings: list[str]
    auth_required: bool
    limits: Limits
