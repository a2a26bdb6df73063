"""Qwen3-MoE: Qwen3's attention (q/k norms shape only the frozen probabilities) and a
mixture of experts without a shared expert; layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) keep a dense gated MLP."""

from engine.families.base import Family
from engine.parts import MixtureMLP

FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), mlp=MixtureMLP())
