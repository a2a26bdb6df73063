"""Architecture adapters: where each model family keeps the parts DePass needs.

Each supported family is one declarative :class:`ArchitectureAdapter` that maps the
canonical roles of a pre-norm decoder layer (input norm, attention, value and output
projections, post-attention norm, gated MLP) to the module paths of its Hugging Face
implementation. The engine only ever talks to roles; families differ in data, not in code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths (dotted, relative to the model or to one decoder layer) of one family.

    Attributes:
        family: short family name reported to users (``llama``, ``qwen2``...).
        layers: path of the ``nn.ModuleList`` of decoder layers, from the model root.
        embed_tokens: token embedding module, from the model root.
        final_norm: the norm applied before the LM head, from the model root.
        lm_head: the unembedding, from the model root.
        input_norm, attention, v_proj, o_proj, post_attention_norm, gate_proj, up_proj,
        down_proj: paths inside one decoder layer.
        norm_eps_attr: attribute of the RMSNorm modules holding epsilon.
        norm_weight_offset: RMSNorm multiplies by ``weight + offset`` (0 for Llama-likes).
    """

    family: str
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    post_attention_norm: str = "post_attention_layernorm"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    norm_eps_attr: str = "variance_epsilon"
    norm_weight_offset: float = 0.0

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return model.get_submodule(self.layers)  # type: ignore[return-value]

    def layer_part(self, model: nn.Module, layer: int, role: str) -> nn.Module:
        """The module playing ``role`` (an attribute name of this class) in ``layer``."""
        return self.decoder_layers(model)[layer].get_submodule(getattr(self, role))

    def root_part(self, model: nn.Module, role: str) -> nn.Module:
        """The module playing ``role`` at the model root (final norm, LM head, embeddings)."""
        return model.get_submodule(getattr(self, role))


LLAMA = ArchitectureAdapter(family="llama")
MISTRAL = ArchitectureAdapter(family="mistral")
QWEN2 = ArchitectureAdapter(family="qwen2")  # q/k/v biases: the value bias goes to the remainder
QWEN3 = ArchitectureAdapter(family="qwen3")  # q/k norms only shape the (captured) probabilities

#: Registry keyed by ``config.architectures[0]``.
ADAPTERS: dict[str, ArchitectureAdapter] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": MISTRAL,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
}


def supported_architectures() -> list[str]:
    """Names of the Hugging Face architectures the engine supports."""
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of ``model``, found from its config or class name.

    Raises:
        UnsupportedArchitectureError: no adapter; the message lists the supported ones.
    """
    config = getattr(model, "config", None)
    declared = list(getattr(config, "architectures", None) or [])
    return adapter_named([*declared, type(model).__name__])


def adapter_named(names: list[str]) -> ArchitectureAdapter:
    """The adapter of the first of ``names`` (HF architecture names) that has one.

    Raises:
        UnsupportedArchitectureError: none has; the message lists the supported ones.
    """
    for name in names:
        if name in ADAPTERS:
            return ADAPTERS[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names[0] if names else None!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def rms_scale(norm: nn.Module, x: torch.Tensor, adapter: ArchitectureAdapter) -> torch.Tensor:
    """Per-position inverse RMS of ``x`` (..., N, D) -> (..., N, 1), as ``norm`` computes it."""
    eps = float(getattr(norm, adapter.norm_eps_attr))
    x32 = x.to(torch.float32)
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def norm_weight(norm: nn.Module, adapter: ArchitectureAdapter) -> torch.Tensor:
    """The (D,) gain an RMSNorm applies after scaling."""
    return norm.weight.detach() + adapter.norm_weight_offset
