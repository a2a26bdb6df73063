"""Shape facts of a loaded model, shared by the engine, its memory estimate and the
service's ``GET /v1/model`` (whose schema is built from this class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from engine.families import Family


def _fact(description: str) -> Any:
    """A field whose meaning the HTTP schema shows."""
    return field(metadata={"description": description})


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of the loaded model."""

    architecture: str = _fact("The transformers class, e.g. LlamaForCausalLM.")
    family: str = _fact("The engine's model family (llama, qwen2, gemma3, gpt2, ...).")
    num_layers: int = _fact("Decoder layers (L).")
    num_heads: int = _fact("Attention (query) heads per layer.")
    num_kv_heads: int = _fact("Key/value heads per layer.")
    head_dim: int = _fact("Width of one head.")
    hidden_size: int = _fact("Width of the residual stream (D).")
    intermediate_size: int = _fact(
        "MLP width: neurons per layer (a mixture of experts: every expert's neurons, expert "
        "by expert, then a shared expert's; the widest layer's where layers differ)."
    )
    vocab_size: int = _fact("Rows of the embedding.")
    dtype: str = _fact("Weight dtype.")
    device: str = _fact("Where the embedding is (cuda:0, cpu, ...).")
    logit_softcap: float | None = _fact(
        "The final soft-cap c of c tanh(z / c) on the logits (Gemma 2), or null."
    )


def model_info(model: nn.Module, family: Family) -> ModelInfo:
    """The facts of ``model``, from its family's parts (configs name them differently)."""
    config = model.config
    first = family.layer(model, 0)
    attention = family.attention.shape(first, config)
    embed = family.embeddings(model)
    parameter = next(embed.parameters())  # (V, D) the embedding table
    num_layers = len(family.decoder_layers(model))
    return ModelInfo(
        architecture=type(model).__name__,
        family=family.name,
        num_layers=num_layers,
        num_heads=attention.heads,
        num_kv_heads=attention.kv_heads,
        head_dim=attention.head_dim,
        hidden_size=int(parameter.shape[1]),
        intermediate_size=max(family.neuron_width(model, i) for i in range(num_layers)),
        vocab_size=family.readout.vocab_size(family.unembed(model)),
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        logit_softcap=family.readout.softcap(config),
    )
