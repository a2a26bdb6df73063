"""The bodies of ``POST /v1/generate``: a continuation and each generated token's
attribution to the tokens before it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.request import MIN_TEMPERATURE
from engine.splits import SplitRule
from service.protocol import ArrayOptions, ChatMessage, EncodedArray, NonNegativeInt, one_input


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
        one_input(self)
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
