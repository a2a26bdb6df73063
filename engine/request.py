"""The attribution request: one pydantic model shared by the engine, the HTTP API and the SDK.

Checks that need no model (types, ranges, conflicting fields, finite numbers) live here;
checks that need the model (layer and position ranges, vocabulary, subspace shape) are made
by the engine and raise :class:`RequestError`. Both name the offending field.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.splits import SplitRule

Granularity = Literal["token", "module", "head", "neuron", "subspace"]
Output = Literal["scores", "states"]


class RequestError(ValueError):
    """A request that does not fit the loaded model; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


NonNegativeInt = Annotated[int, Field(ge=0)]


class AttributionRequest(BaseModel):
    """What to decompose, how, and what to return.

    Layer conventions: ``start_layer=s`` decomposes the residual entering layer ``s`` for
    token and subspace runs, and the parts of layer ``s`` for module, head and neuron
    runs; ``end_layer=e`` stops at the residual entering layer ``e`` (``None``: the model
    output, after the final norm).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    prompt: str | None = Field(None, description="Text to attribute (or give input_ids).")
    input_ids: list[NonNegativeInt] | None = Field(
        None, description="Token ids to attribute (or give prompt); used as given."
    )
    granularity: Granularity = Field("token", description="What the components are.")
    start_layer: NonNegativeInt | list[NonNegativeInt] = Field(
        0, description="Layer to decompose; for head runs also a list of layers."
    )
    end_layer: NonNegativeInt | None = Field(
        None, description="Stop at the residual entering this layer; None: model output."
    )
    module: Literal["attn", "mlp"] | None = Field(
        None, description="Which module of start_layer (granularity='module')."
    )
    neurons: list[NonNegativeInt] | None = Field(
        None, description="MLP neurons of start_layer to keep apart (granularity='neuron')."
    )
    groups: list[list[int]] | None = Field(
        None, description="Token groups, each one component (granularity='token')."
    )
    subspace: Any = Field(
        None, description="(K, N, D) components of the residual entering start_layer."
    )
    mlp_split: SplitRule = Field("softmax", description="MLP split rule.")
    temperature: float = Field(0.1, gt=0, description="Softmax temperature of the split.")
    ignore_bos: bool | None = Field(
        None, description="First-token rule; None: on for token runs, off otherwise."
    )
    all_layers: bool = Field(
        False, description="Token runs: the decomposition entering every layer from start."
    )
    targets: list[int | str] | None = Field(
        None, description="Token ids or strings to score; None: the model's top-1 next token."
    )
    positions: list[int] | None = Field(
        None, description="Positions to return (negative counts from the end); None: all."
    )
    outputs: list[Output] = Field(
        default_factory=lambda: ["scores"], description="'scores' and/or 'states'."
    )

    @field_validator("temperature")
    @classmethod
    def _finite_temperature(cls, value: float) -> float:
        # Below ~1e-38 the gates times 1/T overflow float32; no useful split needs less.
        if not math.isfinite(value) or value < 1e-30:
            raise ValueError("must be a finite number of at least 1e-30")
        return value

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one of 'scores', 'states'")
        return list(dict.fromkeys(value))

    @field_validator("groups")
    @classmethod
    def _groups_shape(cls, value: list[list[int]] | None) -> list[list[int]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must hold at least one group")
        seen: set[int] = set()
        for index, group in enumerate(value):
            if not group:
                raise ValueError(f"group {index} is empty")
            if len(set(group)) != len(group) or seen & set(group):
                raise ValueError(f"group {index} repeats a position; groups must be disjoint")
            seen |= set(group)
        return value

    @field_validator("subspace", mode="before")
    @classmethod
    def _subspace_array(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            array = value.detach().to("cpu", torch.float32).numpy()
        else:
            try:
                array = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError("must be a numeric (K, N, D) array") from exc
        if array.ndim != 3 or array.shape[0] < 1:
            raise ValueError(f"must have shape (K, N, D) with K >= 1, got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("must hold finite numbers only")
        return array

    @model_validator(mode="after")
    def _consistent(self) -> AttributionRequest:
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'prompt' and 'input_ids'")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids: must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt: must not be empty")
        g = self.granularity
        if isinstance(self.start_layer, list):
            if g != "head":
                raise ValueError("start_layer: a list of layers is allowed for head runs only")
            if not self.start_layer:
                raise ValueError("start_layer: the list of layers is empty")
        if (self.module is None) == (g == "module"):
            raise ValueError("module: required for granularity='module' and only there")
        if self.neurons is not None and g != "neuron":
            raise ValueError("neurons: only for granularity='neuron'")
        if self.groups is not None and g != "token":
            raise ValueError("groups: only for granularity='token'")
        if (self.subspace is None) == (g == "subspace"):
            raise ValueError("subspace: required for granularity='subspace' and only there")
        if self.all_layers and g != "token":
            raise ValueError("all_layers: only for granularity='token'")
        return self

    @property
    def start_layers(self) -> list[int]:
        """``start_layer`` as a list."""
        return list(self.start_layer) if isinstance(self.start_layer, list) else [self.start_layer]

    @property
    def first_token_rule(self) -> bool:
        """Whether the first-token rule is on (its default depends on the granularity)."""
        return self.granularity == "token" if self.ignore_bos is None else self.ignore_bos
