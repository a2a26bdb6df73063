"""The request bodies' fields, as typed keyword arguments of both clients.

One :class:`typing.TypedDict` per body: :class:`Client` and :class:`AsyncClient` take
its keys as keyword arguments (``**fields: Unpack[AttributionFields]``), so that a type
checker and an editor know every field, and ``attribute_many`` takes a list of
:class:`AttributionParams`. A field left out, or given as ``None``, takes the service's
default (``array_encoding`` excepted: the SDK asks for the best encoding it can decode).
Names, types and choices are those of the service's request schemas: a contract test
(``tests/client/test_client_contract.py``) holds them equal to its OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict, get_args

import numpy as np

#: What the components of an attribution can be.
Granularity = Literal["token", "module", "head", "neuron", "subspace"]
#: How an MLP's output is split among its inputs.
SplitRule = Literal["softmax", "relu", "max", "linear", "taylor"]
#: How the scores are computed (``auto``: the service picks).
Strategy = Literal["auto", "forward", "reverse"]
Output = Literal["scores", "states"]
Role = Literal["system", "user", "assistant"]
#: How response arrays travel (``auto``: lists when small, compressed when large).
ArrayEncoding = Literal["auto", "zstd+base64", "base64", "list"]
#: Element type of response arrays.
ArrayDtype = Literal["float32", "float16"]

GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SPLIT_RULES: tuple[str, ...] = get_args(SplitRule)
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class ChatMessage(TypedDict):
    """One turn of a chat."""

    role: Role
    content: str


class EncodedArray(TypedDict):
    """An array object of the service: ``{"dtype", "shape", "encoding", "data"}``."""

    dtype: Literal["float16", "float32", "float64"]
    shape: list[int]
    encoding: Literal["zstd+base64", "base64", "list"]
    data: str | list[Any]


class ArrayFields(TypedDict, total=False):
    """How the response's arrays travel."""

    array_encoding: ArrayEncoding | None
    array_dtype: ArrayDtype | None


class AttributionFields(ArrayFields, total=False):
    """``POST /v1/attributions`` besides ``prompt``: what to decompose, how, what to return.

    The meaning of each field is in docs/api.md (and the service's ``/docs`` page).
    """

    input_ids: Sequence[int] | None
    messages: Sequence[ChatMessage] | None
    granularity: Granularity | None
    start_layer: int | Sequence[int] | None
    end_layer: int | None
    module: Literal["attn", "mlp"] | None
    neurons: Sequence[int] | None
    groups: Sequence[Sequence[int]] | None
    #: (K, N, D): a numpy array, encoded by the SDK, or an encoded array object.
    subspace: np.ndarray | EncodedArray | None
    mlp_split: SplitRule | None
    temperature: float | None
    ignore_bos: bool | None
    all_layers: bool | None
    targets: Sequence[int | str] | None
    positions: Sequence[int] | None
    outputs: Sequence[Output] | None
    strategy: Strategy | None
    top_k: int | None


class AttributionParams(AttributionFields, total=False):
    """One request of ``attribute_many``: :class:`AttributionFields` and the ``prompt``."""

    prompt: str | None


class GenerationFields(ArrayFields, total=False):
    """``POST /v1/generate`` besides ``prompt``: how to continue and attribute."""

    input_ids: Sequence[int] | None
    messages: Sequence[ChatMessage] | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop_at_eos: bool | None
    mlp_split: SplitRule | None
    split_temperature: float | None
    ignore_bos: bool | None


class NextTokensFields(TypedDict, total=False):
    """``POST /v1/next_tokens`` besides ``prompt``: where to predict, how many tokens."""

    input_ids: Sequence[int] | None
    positions: Sequence[int] | None
    top_k: int | None
