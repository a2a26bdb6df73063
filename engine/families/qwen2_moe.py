"""Qwen2-MoE: Qwen2's attention (q/k/v biases) and a mixture of experts plus a shared
expert, a gated MLP whose output is scaled by ``sigmoid(shared_expert_gate(x))`` (frozen
per position); layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) keep a
dense gated MLP."""

from engine.families.base import Family
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
)
