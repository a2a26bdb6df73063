"""Gemma 2: ``(1 + w)`` RMSNorms before and after both mixers, and a final logit soft-cap.

``post_attention_layernorm`` normalises the attention OUTPUT (not the residual, as in
Llama), ``pre_feedforward_layernorm`` is the MLP's pre-norm and
``post_feedforward_layernorm`` normalises the MLP output. Attention soft-capping is inside
the frozen probabilities; the final soft-cap ``c tanh(z / c)`` is not linear, so scores add
up to the logit ``z`` before the cap (the result reports both).
"""

from dataclasses import replace

from engine.families.base import TINY_SPECIAL_IDS, TinyConfig
from engine.families.gemma import FAMILY as GEMMA
from engine.parts import Readout, RMSNorm

FAMILY = replace(
    GEMMA,
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    attn_post_norm=RMSNorm("post_attention_layernorm", offset=1.0),
    mlp_norm=RMSNorm("pre_feedforward_layernorm", offset=1.0),
    mlp_post_norm=RMSNorm("post_feedforward_layernorm", offset=1.0),
    readout=Readout(softcap_attr="final_logit_softcapping"),
    # a soft-cap that bites at this scale; a local layer (window 3) before a global one
    tiny=TinyConfig(
        {
            **TINY_SPECIAL_IDS,
            "final_logit_softcapping": 2.0,
            "sliding_window": 3,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    ),
)
