"""Qwen3: Llama's parts; its q/k norms only shape the (frozen) attention probabilities."""

from engine.families.base import Family

FAMILY = Family(name="qwen3", architectures=("Qwen3ForCausalLM",))
