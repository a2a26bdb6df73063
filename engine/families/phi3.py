"""Phi-3: Llama's layout with fused projections, ``qkv_proj`` (rows ``[q | k | v]``) and
``gate_up_proj`` (the gate is the first half)."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import FusedAttention, GatedMLP

FAMILY = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    attention=FusedAttention(qkv="self_attn.qkv_proj"),
    mlp=GatedMLP(gate="mlp.gate_up_proj", fused=True),
    tiny=TinyConfig(TINY_SPECIAL_IDS),
)
