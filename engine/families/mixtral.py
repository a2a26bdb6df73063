"""Mixtral: Llama's attention and norms; every layer's MLP a sparse mixture of experts
(``mlp.experts``, routed by ``mlp.gate``), with the routing frozen."""

from engine.families.base import Family, TinyConfig
from engine.parts import MixtureMLP

FAMILY = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    mlp=MixtureMLP(),
    # four experts of 48 neurons, two chosen per position
    tiny=TinyConfig({"num_local_experts": 4, "num_experts_per_tok": 2}),
)
