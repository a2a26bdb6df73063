"""Qwen2-MoE: Qwen2's attention (q/k/v biases) and a mixture of experts plus a shared
expert, a gated MLP whose output is scaled by ``sigmoid(shared_expert_gate(x))`` (frozen
per position); layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) keep a
dense gated MLP."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig
from engine.parts import GatedMLP, MixtureMLP

FAMILY = Family(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    mlp=MixtureMLP(
        shared=GatedMLP(
            gate="mlp.shared_expert.gate_proj",
            down="mlp.shared_expert.down_proj",
            module="mlp.shared_expert",
        ),
        shared_up="mlp.shared_expert.up_proj",
        shared_gate="mlp.shared_expert_gate",
    ),
    # four experts of 16 neurons, two chosen per position, and a shared expert of 24;
    # layer 0 a mixture, layer 1 a dense MLP
    tiny=TinyConfig(
        {
            **TINY_SPECIAL_IDS,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "mlp_only_layers": [1],
        },
        bias_std=0.2,
    ),
)
