"""Qwen3-MoE: Qwen3's attention (q/k norms shape only the frozen probabilities) and a
mixture of experts without a shared expert; layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) keep a dense gated MLP."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import MixtureMLP

FAMILY = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    mlp=MixtureMLP(),
    # four experts of 16 neurons, two chosen per position
    tiny=TinyConfig(
        {
            **TINY_SPECIAL_IDS,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "norm_topk_prob": True,
        }
    ),
)
