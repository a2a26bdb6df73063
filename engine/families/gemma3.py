"""Gemma 3 (text, ``Gemma3ForCausalLM``): Gemma 2's parts; its q/k norms and local/global
attention layers only shape the frozen probabilities. Gemma-3 checkpoints set no final
soft-cap, but a config that does gets it, as in Gemma 2."""

from dataclasses import replace

from engine.families.base import TINY_SPECIAL_IDS, TinyConfig
from engine.families.gemma2 import FAMILY as GEMMA2

FAMILY = replace(
    GEMMA2,
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    # a local layer (window 3) before a global one
    tiny=TinyConfig(
        {
            **TINY_SPECIAL_IDS,
            "sliding_window": 3,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    ),
)
