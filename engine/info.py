"""Shape facts of a loaded model, shared by the engine and its memory estimate."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of the loaded model."""

    architecture: str
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    device: str
    logit_softcap: float | None = None  # the final soft-cap c of c tanh(z / c), if any
