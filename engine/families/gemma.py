"""Gemma (1): Llama's layout with RMSNorms that multiply by ``(1 + w)``; the embedding
scales by ``sqrt(D)`` inside its own module (so the scaling is part of ``h^0``)."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import RMSNorm

FAMILY = Family(
    name="gemma",
    architectures=("GemmaForCausalLM",),
    attn_norm=RMSNorm("input_layernorm", offset=1.0),
    mlp_norm=RMSNorm("post_attention_layernorm", offset=1.0),
    final_norm=RMSNorm("model.norm", offset=1.0),
    tiny=TinyConfig(TINY_SPECIAL_IDS),
)
