"""Request and response bodies of the HTTP API (pydantic, with field descriptions).

The attribution body carries the fields of the engine's :class:`engine.AttributionRequest`
(same names, defaults and descriptions; the engine's dataclass runs the checks that span
fields), with ``subspace`` as an encoded array object and two transport options.
Shapes use the engine's axis names: P positions, M components, D hidden, T targets,
G generated tokens. Request bodies are strict: JSON types must be the declared ones (``1``
is not ``true``, ``"1"`` is not ``1``, ``1.0`` is not an integer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from engine.info import ModelInfo
from engine.request import (
    FIELD_DOCS,
    MIN_TEMPERATURE,
    Granularity,
    Output,
    RequestError,
    Role,
    Strategy,
    check_one_input,
)
from engine.splits import SplitRule
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


def _one_input(body: Any) -> None:
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


def _doc(name: str) -> str:
    return FIELD_DOCS[name]


class AttributionBody(ArrayOptions):
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

    prompt: str | None = Field(None, description=_doc("prompt"))
    input_ids: list[NonNegativeInt] | None = Field(None, description=_doc("input_ids"))
    messages: list[ChatMessage] | None = Field(None, description=_doc("messages"))
    granularity: Granularity = Field("token", description=_doc("granularity"))
    start_layer: NonNegativeInt | list[NonNegativeInt] = Field(0, description=_doc("start_layer"))
    end_layer: NonNegativeInt | None = Field(None, description=_doc("end_layer"))
    module: Literal["attn", "mlp"] | None = Field(None, description=_doc("module"))
    neurons: list[NonNegativeInt] | None = Field(None, description=_doc("neurons"))
    groups: list[list[int]] | None = Field(None, description=_doc("groups"))
    subspace: EncodedArray | None = Field(
        None, description=f"granularity='subspace': {_doc('subspace')} An encoded array."
    )
    mlp_split: SplitRule = Field("softmax", description=_doc("mlp_split"))
    temperature: float = Field(
        0.1, ge=MIN_TEMPERATURE, allow_inf_nan=False, description=_doc("temperature")
    )
    ignore_bos: bool | None = Field(None, description=_doc("ignore_bos"))
    all_layers: bool = Field(False, description=_doc("all_layers"))
    targets: list[int | str] | None = Field(None, description=_doc("targets"))
    positions: list[int] | None = Field(None, description=_doc("positions"))
    outputs: list[Output] = Field(default_factory=lambda: ["scores"], description=_doc("outputs"))
    strategy: Strategy = Field("auto", description=_doc("strategy"))
    top_k: PositiveInt | None = Field(None, description=_doc("top_k"))

    @field_validator("subspace", mode="before")
    @classmethod
    def _subspace_array(cls, value: Any) -> Any:
        """Keep the wire object: it is decoded, with size limits, by the serving layer."""
        return value


class AttributionResponse(BaseModel):
    """Components of the residual stream and their logit scores.

    Arrays carry a leading layer axis when ``layers`` is set (``all_layers`` runs or a
    list of head layers).
    """

    object: Literal["attribution"] = "attribution"
    model: str = Field(description="The model that answered.")
    tokens: list[str] = Field(description="(N,) text of each input token.")
    input_ids: list[int] = Field(description="(N,) input token ids.")
    components: list[str] = Field(
        description="(M,) component labels, e.g. 'tok[3]:\"Paris\"'; for a list of head "
        "layers without the layer ('H0'), which layer_components adds."
    )
    layer_components: list[list[str]] | None = Field(
        None,
        description="([layers,] M) each layer's component labels ('L3.H0') when they differ "
        "by layer (a list of head layers); null otherwise.",
    )
    first_positions: list[int] = Field(
        description="(M,) the first position where each component exists (a later token "
        "is exactly 0 before it); 0 for all but token components."
    )
    positions: list[int] = Field(description="(P,) non-negative positions returned.")
    targets: list[int] = Field(description="(T,) token ids scored at the last position returned.")
    target_tokens: list[str] = Field(description="(T,) text of each target.")
    position_targets: list[list[int]] = Field(
        description="(P, T) the token ids scored at each position: the asked targets, or "
        "by default each position's own top-1 next token (T = 1)."
    )
    position_target_tokens: list[list[str]] = Field(description="(P, T) their texts.")
    granularity: str = Field(description="What the components are.")
    mlp_split: str = Field(description="MLP split rule used.")
    end: str = Field(description="'output' (after the final norm) or 'layer e'.")
    layers: list[int] | None = Field(description="Layers of the leading axis, if any.")
    conservation_error: float = Field(
        description="max |sum(components) + remainder - true state| (completeness check)."
    )
    relative_conservation_error: float = Field(description="conservation_error / max |true state|.")
    ignore_bos: bool = Field(
        description="The first-token rule applied: the request's ignore_bos, or its default "
        "for this prompt (on for token runs whose first token is a special token the "
        "tokenizer added, off otherwise)."
    )
    timings: dict[str, float] = Field(
        description="Seconds: queue_s, forward_s, decompose_s, total_s; and batch_size, the "
        "requests run together with this one (1: alone), whose forward and decomposition "
        "times are shared."
    )
    scores: EncodedArray | None = Field(
        None, description="([layers,] P, M, T) logit contribution of each component."
    )
    remainder_scores: EncodedArray | None = Field(
        None, description="([layers,] P, T) the remainder's (biases') logit contribution."
    )
    states: EncodedArray | None = Field(
        None, description="([layers,] P, M, D) components of the state."
    )
    remainder: EncodedArray | None = Field(
        None, description="([layers,] P, D) the remainder (bias) component of the state."
    )
    logits: EncodedArray | None = Field(
        None, description="([layers,] P, T) each target's logit: scores summed + remainder."
    )
    logit_softcap: float | None = Field(
        None,
        description="The model's final soft-cap c (Gemma 2): logits are c tanh(z / c), and "
        "scores add up to the logit z before the cap; null for models without one.",
    )
    capped_logits: EncodedArray | None = Field(
        None, description="([layers,] P, T) c tanh(logits / c), what the model outputs."
    )
    strategy: Literal["forward", "reverse"] = Field(
        "forward",
        description="How the scores were computed: 'forward' (every component carried "
        "through the network) or 'reverse' (every score from one gradient; taylor split).",
    )
    kept_top_k: int | None = Field(
        None,
        description="The request's top_k: components holds only those among the k largest "
        "|score| of some position and target; null: every component.",
    )


class GenerateBody(ArrayOptions):
    """``POST /v1/generate``: continue a prompt and attribute every generated token."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"prompt": "The capital of France is", "max_new_tokens": 4}]
        },
    )

    prompt: str | None = Field(
        None, description="Text to continue (or give input_ids or messages)."
    )
    input_ids: list[NonNegativeInt] | None = Field(
        None, description="Token ids to continue (or give prompt or messages)."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        description="A chat to answer, in the model's chat template with the generation "
        "prompt appended (or give prompt or input_ids).",
    )
    max_new_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        0.0, ge=0, description="Sampling temperature; 0 (the default) is greedy decoding."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (temperature > 0).")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Sampling seed; the response reports the one used."
    )
    stop_at_eos: bool = Field(True, description="Stop after the end-of-sequence token.")
    mlp_split: SplitRule = Field("softmax", description="MLP split rule of the attribution.")
    split_temperature: float = Field(
        0.1,
        ge=MIN_TEMPERATURE,
        description=f"Softmax temperature of the MLP split (not of sampling); at least "
        f"{MIN_TEMPERATURE:g}.",
    )
    ignore_bos: bool | None = Field(
        None,
        description="First-token rule; None: on when the prompt's first token is a special "
        "token the tokenizer added (BOS, a chat template's), off otherwise.",
    )

    @field_validator("temperature", "top_p", "split_temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateBody:
        _one_input(self)
        return self


class GenerateResponse(BaseModel):
    """The continuation and, for each generated token, its attribution to the tokens before."""

    object: Literal["generation"] = "generation"
    model: str = Field(description="The model that answered.")
    text: str = Field(description="The generated text (special tokens skipped).")
    finish_reason: Literal["length", "stop"] = Field(
        description="'stop': the end-of-sequence token; 'length': max_new_tokens reached."
    )
    seed: int | None = Field(description="Sampling seed used (None when greedy).")
    prompt_ids: list[int] = Field(description="(N,) prompt token ids.")
    prompt_tokens: list[str] = Field(description="(N,) prompt token texts.")
    generated_ids: list[int] = Field(description="(G,) generated token ids.")
    generated_tokens: list[str] = Field(description="(G,) generated token texts.")
    components: list[str] = Field(
        description="(M,) labels of the attributed tokens: the prompt and all but the last "
        "generated token (M = N + G - 1)."
    )
    positions: list[int] = Field(description="(G,) the position each generated token follows.")
    conservation_error: float = Field(description="As for attributions.")
    relative_conservation_error: float = Field(description="As for attributions.")
    timings: dict[str, float] = Field(
        description="Seconds: queue_s, generate_s, forward_s, decompose_s, total_s."
    )
    scores: EncodedArray | None = Field(
        None, description="(G, M) each token's contribution to each generated token's logit."
    )
    remainder_scores: EncodedArray | None = Field(
        None, description="(G,) the remainder's contribution."
    )
    logits: EncodedArray | None = Field(None, description="(G,) each generated token's logit.")


class TokenizeBody(BaseModel):
    """``POST /v1/tokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="Text to tokenize as the model sees it.")


class TokenizeResponse(BaseModel):
    """Token ids and texts, special tokens included."""

    object: Literal["tokenization"] = "tokenization"
    input_ids: list[int] = Field(description="(N,) token ids.")
    tokens: list[str] = Field(description="(N,) text of each token.")
    num_tokens: int = Field(description="N.")


class NextTokensBody(BaseModel):
    """``POST /v1/next_tokens``: the model's most likely next tokens at some positions."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "The capital of France is", "top_k": 5}]},
    )

    prompt: str | None = Field(None, description="Text to read (or give input_ids).")
    input_ids: list[NonNegativeInt] | None = Field(
        None, description="Token ids to read (or give prompt)."
    )
    positions: list[int] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        description="Positions whose next token to predict (negative counts from the end).",
    )
    top_k: int = Field(5, ge=1, le=100, description="How many tokens per position.")

    @model_validator(mode="after")
    def _one_input(self) -> NextTokensBody:
        _one_input(self)
        return self


class NextToken(BaseModel):
    """One candidate next token."""

    id: int = Field(description="Token id (send it as an attribution target).")
    token: str = Field(description="Text of the token.")
    logit: float = Field(description="Its logit.")
    probability: float = Field(description="softmax of the logits over the vocabulary.")


class NextTokensResponse(BaseModel):
    """The ``top_k`` most likely next tokens after each asked position, most likely first."""

    object: Literal["next_tokens"] = "next_tokens"
    model: str = Field(description="The model that answered.")
    tokens: list[str] = Field(description="(N,) text of each input token.")
    input_ids: list[int] = Field(description="(N,) input token ids.")
    positions: list[int] = Field(description="(P,) non-negative positions, as asked.")
    predictions: list[list[NextToken]] = Field(description="(P, top_k) candidates.")


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


def _model_facts() -> type[BaseModel]:
    """A pydantic model of the engine's :class:`engine.ModelInfo`, field for field."""
    types = get_type_hints(ModelInfo)
    fields: dict[str, Any] = {
        f.name: (types[f.name], Field(description=f.metadata.get("description")))
        for f in dataclasses.fields(ModelInfo)
    }
    return create_model("ModelFacts", **fields)


#: The model facts of ``GET /v1/model``: the fields of :class:`engine.ModelInfo`.
ModelFacts = _model_facts()


class ModelResponse(ModelFacts):  # type: ignore[misc,valid-type]
    """``GET /v1/model``: what is loaded (the engine's model facts) and the limits in force."""

    object: Literal["model"] = "model"
    id: str = Field(description="Model name (hub id, or the folder name of a local model).")
    compute_dtype: str = Field(description="Dtype of the propagated components.")
    granularities: list[str]
    mlp_splits: list[str]
    array_encodings: list[str]
    auth_required: bool
    limits: Limits


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness: the model is loaded."""

    status: Literal["ready"] = "ready"
    model: str


class ErrorDetail(BaseModel):
    """What went wrong."""

    message: str = Field(description="Human-readable; names the field when one is at fault.")
    type: str = Field(description="Broad class, e.g. 'invalid_request_error'.")
    param: str | None = Field(None, description="The offending request field, if any.")
    code: str | None = Field(None, description="Precise reason, e.g. 'queue_full'.")


class ErrorResponse(BaseModel):
    """The one error envelope of every failure."""

    error: ErrorDetail
