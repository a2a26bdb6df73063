"""Llama 2/3.x (``LlamaForCausalLM``): the pre-norm layout every default part describes."""

from engine.families.base import Family

FAMILY = Family(name="llama", architectures=("LlamaForCausalLM",))
