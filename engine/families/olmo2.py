"""OLMo-2: post-norms only. Attention and MLP read the residual itself; their outputs are
RMS-normalised (``post_attention_layernorm``, ``post_feedforward_layernorm``) before they
are added. Its q/k norms only shape the frozen probabilities."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import RMSNorm

FAMILY = Family(
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    attn_norm=None,
    attn_post_norm=RMSNorm("post_attention_layernorm"),
    mlp_norm=None,
    mlp_post_norm=RMSNorm("post_feedforward_layernorm"),
    tiny=TinyConfig(TINY_SPECIAL_IDS),
)
