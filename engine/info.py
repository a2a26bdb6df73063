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
    """The facts of ``model``, read from its family's parts' weights (configs name them
    differently)."""
    config = model.config
    heads = int(config.num_attention_heads)
    first = family.layer(model, 0)
    head_dim = family.attention.output(first, config).weight.shape[1] // heads  # H d_h / H
    embed = family.embeddings(model)
    num_layers = len(family.decoder_layers(model))
    return ModelInfo(
        architecture=type(model).__name__,
        family=family.name,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=family.attention.value(first, config).weight.shape[0] // head_dim,
        head_dim=head_dim,
        hidden_size=int(embed.weight.shape[1]),
        intermediate_size=max(family.neuron_width(model, i) for i in range(num_layers)),
        vocab_size=int(family.unembed(model).weight.shape[0]),
        dtype=str(embed.weight.dtype).removeprefix("torch."),
        device=str(embed.weight.device),
        logit_softcap=family.readout.softcap(config),
    )
