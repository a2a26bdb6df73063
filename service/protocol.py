"""The models every endpoint shares, and the bodies derived from the engine's dataclasses.

Each endpoint's own bodies are in its ``protocol.py`` (:mod:`service.endpoints`); this
module holds what they share: the error envelope, encoded arrays and their options, chat
messages, and :func:`dataclass_fields`, which builds a pydantic model's fields from an
engine dataclass (:class:`engine.AttributionRequest`, :class:`engine.AttributionResult`,
:class:`engine.ModelInfo`) so that each field's type, description and floor are written
once, next to the engine's field. Shapes use the engine's axis names: P positions, M
components, D hidden, T targets, G generated tokens. Request bodies are strict: JSON types
must be the declared ones (``1`` is not ``true``, ``"1"`` is not ``1``, ``1.0`` is not an
integer).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

from engine.request import RequestError, Role, check_one_input
from service.arrays import RequestedEncoding, WireDtype

#: The media type of a binary (safetensors) response; send it in ``Accept`` to get one.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
#: The safetensors ``__metadata__`` key holding the JSON fields of a binary response.
SAFETENSORS_METADATA_KEY = "depass"

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]


class ChatMessage(BaseModel):
    """One turn of a chat."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Role = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(description="What they say.")


def one_input(body: Any) -> None:
    """The engine's rule: exactly one of prompt, input_ids and messages (a 422 naming it)."""
    given = getattr(body, "messages", None)  # bodies without chat input have no field
    messages = None if given is None else list(given)
    try:
        check_one_input(body.prompt, body.input_ids, messages)
    except RequestError as exc:
        raise ValueError(str(exc)) from None


class EncodedArray(BaseModel):
    """An n-dimensional array: binary little-endian (optionally zstd) in base64, or lists."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dtype: Literal["float16", "float32", "float64"] = Field(
        description="Element type (responses: float32 or float16; requests also float64)."
    )
    shape: list[NonNegativeInt] = Field(description="Size of each axis, outermost first.")
    encoding: Literal["zstd+base64", "base64", "list"] = Field(
        description="'zstd+base64': zstandard-compressed bytes in base64; 'base64': raw "
        "bytes in base64; 'list': JSON nested lists."
    )
    data: str | list[Any] = Field(description="The base64 text, or the nested lists.")


class ArrayOptions(BaseModel):
    """How the response's arrays travel."""

    array_encoding: RequestedEncoding = Field(
        "auto",
        description="Encoding of response arrays; 'auto': lists up to 64 elements, "
        "'zstd+base64' above.",
    )
    array_dtype: WireDtype = Field(
        "float32", description="Element type of response arrays: 'float32' (exact) or 'float16'."
    )


#: A pydantic field: its annotation and its :class:`pydantic.fields.FieldInfo` (``Field()``).
WireField = tuple[Any, Any]


def dataclass_fields(
    source: type, *, response: bool = False, wire: Mapping[str, WireField] | None = None
) -> dict[str, WireField]:
    """The pydantic fields of an engine dataclass, field for field and in its order.

    Each field keeps its type and the ``description`` of its ``metadata``; its
    ``minimum`` bounds every integer and float in it; tensors travel as
    :class:`EncodedArray`. A request (``response=False``) keeps the dataclass's defaults and
    takes finite floats only; a response carries every field (required) but its arrays,
    which are absent when not asked for. ``wire`` replaces the fields whose HTTP form
    differs from the engine's (e.g. a chat as :class:`ChatMessage` objects).
    """
    hints = get_type_hints(source)
    fields: dict[str, WireField] = {}
    for item in dataclasses.fields(source):
        if wire and item.name in wire:
            fields[item.name] = wire[item.name]
            continue
        minimum = item.metadata.get("minimum")
        annotation = _wire_type(hints[item.name], minimum, finite=not response)
        extra: dict[str, Any] = {"description": item.metadata.get("description")}
        if response:
            if _holds_tensor(hints[item.name]):
                extra["default"] = None
                annotation = EncodedArray | None
        elif item.default is not dataclasses.MISSING:
            extra["default"] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            extra["default_factory"] = item.default_factory
        fields[item.name] = (annotation, Field(**extra))
    return fields


def derived_model(
    name: str, fields: dict[str, WireField], base: type[BaseModel] = BaseModel
) -> Any:
    """A pydantic model of ``fields`` (from :func:`dataclass_fields`) on ``base``; its fields
    are known at run time only, so it is ``Any`` to the type checker, and a class that
    subclasses it (for a docstring, a config, validators) takes any attribute."""
    return create_model(name, __base__=base, **fields)  # type: ignore[call-overload]


def _wire_type(annotation: Any, minimum: float | None, finite: bool) -> Any:
    """``annotation`` as pydantic checks it: numbers bounded below by ``minimum`` (and
    finite where ``finite``), tensors as :class:`EncodedArray`, unions and lists walked."""
    if annotation is torch.Tensor:
        return EncodedArray
    if annotation is int and minimum is not None:
        return Annotated[int, Field(ge=minimum)]
    if annotation is float and (minimum is not None or finite):
        bounds: dict[str, Any] = {} if minimum is None else {"ge": minimum}
        return Annotated[float, Field(allow_inf_nan=not finite, **bounds)]
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return Union[tuple(_wire_type(a, minimum, finite) for a in get_args(annotation))]  # noqa: UP007
    if origin is list:
        (item,) = get_args(annotation)
        return list[_wire_type(item, minimum, finite)]  # type: ignore[misc]
    return annotation


def _holds_tensor(annotation: Any) -> bool:
    """Whether a result field is an array (a tensor, or a tensor or None)."""
    return annotation is torch.Tensor or torch.Tensor in get_args(annotation)


class ErrorDetail(BaseModel):
    """What went wrong."""

    message: str = Field(description="Human-readable; names the field when one is at fault.")
    type: str = Field(description="Broad class, e.g. 'invalid_request_error'.")
    param: str | None = Field(None, description="The offending request field, if any.")
    code: str | None = Field(None, description="Precise reason, e.g. 'queue_full'.")


class ErrorResponse(BaseModel):
    """The one error envelope of every failure."""

    error: ErrorDetail
