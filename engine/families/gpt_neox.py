"""GPT-NeoX (Pythia): LayerNorms, a fused ``query_key_value`` laid out per head
(``[q_h | k_h | v_h]`` for each head), a plain MLP, and (``use_parallel_residual``, the
default) attention and MLP in parallel on the layer's input: ``h + attn(ln1 h) + mlp(ln2 h)``.
``u^l`` is then ``h^l`` plus the attention output, which no residual of the model holds."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import FusedAttention, LayerNorm, PlainMLP

FAMILY = Family(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    layers="gpt_neox.layers",
    embed_tokens="gpt_neox.embed_in",
    attn_norm=LayerNorm("input_layernorm"),
    attention=FusedAttention(
        module="attention",
        qkv="attention.query_key_value",
        o_proj="attention.dense",
        layout="per_head",
    ),
    mlp_norm=LayerNorm("post_attention_layernorm"),
    mlp=PlainMLP(in_proj="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"),
    parallel_attr="use_parallel_residual",
    final_norm=LayerNorm("gpt_neox.final_layer_norm"),
    # no GQA, LayerNorm (and biases that matter), rotary on half of each head
    tiny=TinyConfig(
        {
            "layer_norm_eps": 1e-5,
            "bos_token_id": TINY_SPECIAL_IDS["bos_token_id"],
            "eos_token_id": TINY_SPECIAL_IDS["eos_token_id"],
            "rotary_pct": 0.5,
        },
        without=("num_key_value_heads", "head_dim", "rms_norm_eps"),
        bias_std=0.2,
    ),
)
