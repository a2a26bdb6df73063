"""The bodies of ``POST /v1/attributions``, derived from the engine's dataclasses.

The body's fields are :class:`engine.AttributionRequest`'s (names, types, defaults,
descriptions and floors, from :func:`service.protocol.dataclass_fields`), with the two
fields whose HTTP form differs (a chat as :class:`ChatMessage` objects, ``subspace`` as an
encoded array object) and two transport options; the engine's dataclass runs the checks
that span fields when the engine's request is built from it. The response's fields are
:class:`engine.AttributionResult`'s, with the model's name and the service's timings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine import AttributionRequest, AttributionResult
from service.protocol import (
    ArrayOptions,
    ChatMessage,
    EncodedArray,
    WireField,
    dataclass_fields,
    derived_model,
)


def _about(name: str) -> str:
    """The engine's description of a request field."""
    description: str = AttributionRequest.__dataclass_fields__[name].metadata["description"]
    return description


#: The request fields whose HTTP form differs from the engine's.
BODY_WIRE: dict[str, WireField] = {
    "messages": (list[ChatMessage] | None, Field(None, description=_about("messages"))),
    "subspace": (
        EncodedArray | None,
        Field(None, description=f"granularity='subspace': {_about('subspace')} An encoded array."),
    ),
}

_AttributionFields: Any = derived_model(
    "AttributionFields", dataclass_fields(AttributionRequest, wire=BODY_WIRE), ArrayOptions
)


class AttributionBody(_AttributionFields):
    """``POST /v1/attributions``: the engine's attribution request, over HTTP.

    The fields are :class:`engine.AttributionRequest`'s (a test keeps names and defaults
    equal); the checks that span fields run when the engine's request is built from it.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "When Mary and John went to the store, John gave a drink to"},
                {
                    "prompt": "The capital of France is",
                    "granularity": "head",
                    "start_layer": 1,
                    "positions": [-1],
                    "outputs": ["scores"],
                },
            ]
        },
    )

    @field_validator("subspace", mode="before")
    @classmethod
    def _subspace_array(cls, value: Any) -> Any:
        """Keep the wire object: it is decoded, with size limits, by the serving layer."""
        return value


class _Answer(BaseModel):
    """What an attribution response holds beside the engine's result."""

    object: Literal["attribution"] = "attribution"
    model: str = Field(description="The model that answered.")


#: The result fields whose HTTP form differs from the engine's.
RESPONSE_WIRE: dict[str, WireField] = {
    "timings": (
        dict[str, float],
        Field(
            description="Seconds: queue_s, forward_s, decompose_s, total_s; and batch_size, "
            "the requests run together with this one (1: alone), whose forward and "
            "decomposition times are shared."
        ),
    ),
}

_ResultFields: Any = derived_model(
    "AttributionResultFields",
    dataclass_fields(AttributionResult, response=True, wire=RESPONSE_WIRE),
    _Answer,
)


class AttributionResponse(_ResultFields):
    """Components of the residual stream and their logit scores.

    Arrays carry a leading layer axis when ``layers`` is set (``all_layers`` runs or a
    list of head layers).
    """
