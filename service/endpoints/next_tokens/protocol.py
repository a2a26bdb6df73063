"""The bodies of ``POST /v1/next_tokens``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.protocol import NonNegativeInt, one_input


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
        one_input(self)
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
