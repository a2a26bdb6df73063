"""Mistral: Llama's parts; the sliding window lives in the (frozen) attention probabilities."""

from engine.families.base import Family, TinyConfig

FAMILY = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    tiny=TinyConfig({"sliding_window": 3}),  # a window shorter than the test prompts
)
