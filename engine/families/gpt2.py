"""GPT-2: LayerNorms (centring and bias), a fused ``c_attn`` and a plain (non-gated) MLP,
all Conv1D modules (weights stored transposed). Position embeddings are part of ``h^0``;
the MLP width is ``n_inner`` (or ``4 D``), read from the weights."""

from engine.families.base import Family
from engine.parts import FusedAttention, LayerNorm, PlainMLP

FAMILY = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    layers="transformer.h",
    embed_tokens="transformer.wte",
    attn_norm=LayerNorm("ln_1"),
    attention=FusedAttention(
        module="attn", qkv="attn.c_attn", o_proj="attn.c_proj", transposed=True
    ),
    mlp_norm=LayerNorm("ln_2"),
    mlp=PlainMLP(in_proj="mlp.c_fc", down="mlp.c_proj", transposed=True),
    final_norm=LayerNorm("transformer.ln_f"),
)
