"""GPT-2: LayerNorms (centring and bias), a fused ``c_attn`` and a plain (non-gated) MLP,
all Conv1D modules (weights stored transposed). Position embeddings are part of ``h^0``;
the MLP width is ``n_inner`` (or ``4 D``), read from the weights."""

from engine.families.base import TINY_LLAMA_NAMES, TINY_SPECIAL_IDS, Family, TinyConfig
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
    # its own config names; no GQA; LayerNorm and projection biases that matter
    tiny=TinyConfig(
        {
            "n_embd": 32,
            "n_inner": 48,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "layer_norm_epsilon": 1e-5,
            "bos_token_id": TINY_SPECIAL_IDS["bos_token_id"],
            "eos_token_id": TINY_SPECIAL_IDS["eos_token_id"],
        },
        without=TINY_LLAMA_NAMES,
        bias_std=0.2,
    ),
)
