"""Mixtral: Llama's attention and norms; every layer's MLP a sparse mixture of experts
(``mlp.experts``, routed by ``mlp.gate``), with the routing frozen."""

from engine.families.base import Family
from engine.parts import MixtureMLP

FAMILY = Family(name="mixtral", architectures=("MixtralForCausalLM",), mlp=MixtureMLP())
