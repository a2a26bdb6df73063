"""Mistral: Llama's parts; the sliding window lives in the (frozen) attention probabilities."""

from engine.families.base import Family

FAMILY = Family(name="mistral", architectures=("MistralForCausalLM",))
