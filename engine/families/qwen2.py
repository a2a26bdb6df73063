"""Qwen2/2.5: Llama's parts with q/k/v biases (the value bias goes to the remainder)."""

from engine.families.base import Family, TinyConfig

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    tiny=TinyConfig(bias_std=0.2),  # q/k/v biases large enough to matter
)
