"""The bodies of ``POST /v1/tokenize``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
