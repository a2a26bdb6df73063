"""A model family: a declaration of the typed parts of its decoder layer (engine/parts.py).

A layer is two sub-blocks, attention then MLP, each ``post_norm(mixer(pre_norm(x)))``
added to the residual stream; either norm may be absent (OLMo-2 has post-norms only,
Llama pre-norms only, Gemma 2/3 both). ``parallel`` layers (GPT-NeoX) feed the same input
to both sub-blocks. The read-out is the final norm and the unembedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from engine.parts import (
    Attention,
    AttentionPart,
    DenseMLP,
    GatedMLP,
    MixtureMLP,
    NormPart,
    Readout,
    RMSNorm,
)

#: The norm roles of a layer, in the order the forward pass meets them.
NORM_ROLES: tuple[str, ...] = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")


#: The special token ids of the tests' word tokenizer (engine/testing.py), for configs
#: whose defaults point outside a tiny vocabulary.
TINY_SPECIAL_IDS: Mapping[str, int] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


#: The tiny models' shared config (Llama's names): hidden 32, 2 layers, GQA 4/2, MLP 48.
TINY_DEFAULTS: Mapping[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
#: The defaults a config with names of its own (GPT-2's) does not take.
TINY_LLAMA_NAMES: tuple[str, ...] = tuple(TINY_DEFAULTS)


@dataclass(frozen=True)
class TinyConfig:
    """The tiny random model a family is tested on (like a Hugging Face ``ModelTester``'s
    ``get_config``), declared beside its parts so that a new family is one file.

    :func:`engine.testing.tiny_model` builds it: the model class is the family's first
    architecture, its config class that model's ``config_class``, and the config the
    shared small defaults (hidden 32, 2 layers, GQA 4/2, MLP 48) with ``without``
    dropped and ``settings`` laid over them.

    Attributes:
        settings: config values over the defaults: what the family needs to build at this
            size, and what gives its parts teeth (a sliding window, a soft-cap that bites).
        without: default config names the family's config does not take.
        bias_std: the spread of the random biases (larger where biases are a part).
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    without: tuple[str, ...] = ()
    bias_std: float = 0.1


@dataclass(frozen=True)
class Family:
    """Where one family keeps each part, and what kind of part it is.

    Attributes:
        name: short family name reported to users (``llama``, ``gemma3``...).
        architectures: the Hugging Face architectures (``config.architectures``) it serves.
        layers: path of the ``nn.ModuleList`` of decoder layers, from the model root.
        embed_tokens: the token embedding (its scaling, if any, is part of ``h^0``).
        attn_norm, attn_post_norm, mlp_norm, mlp_post_norm: the layer's norms (paths
            inside one layer), ``None`` where the family has none.
        attention, mlp: the mixers (paths inside one layer).
        parallel: attention and MLP read the same input (``h^l``) and are added together
            (``parallel_attr``: the config attribute that says so, for families that
            have both layouts; :meth:`for_config` reads it).
        final_norm: the norm before the unembedding (path from the model root).
        readout: the unembedding and its soft-cap.
        tiny: the tiny random model every family test runs on (ignored by equality).
    """

    name: str
    architectures: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    attn_norm: NormPart | None = field(default_factory=lambda: RMSNorm("input_layernorm"))
    attention: AttentionPart = field(default_factory=Attention)
    attn_post_norm: NormPart | None = None
    mlp_norm: NormPart | None = field(default_factory=lambda: RMSNorm("post_attention_layernorm"))
    mlp: DenseMLP | MixtureMLP = field(default_factory=GatedMLP)
    mlp_post_norm: NormPart | None = None
    parallel: bool = False
    parallel_attr: str | None = None  # config attribute that decides ``parallel`` (NeoX)
    final_norm: NormPart = field(default_factory=lambda: RMSNorm("model.norm"))
    readout: Readout = field(default_factory=Readout)
    tiny: TinyConfig = field(default_factory=TinyConfig, compare=False)

    def for_config(self, config: object) -> Family:
        """This family as it applies to a model of ``config`` (its layout decided)."""
        if self.parallel_attr is None:
            return self
        parallel = bool(getattr(config, self.parallel_attr))
        return replace(self, parallel=parallel, parallel_attr=None)

    # ------------------------------------------------------------------ modules

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""
        return model.get_submodule(self.layers)  # type: ignore[return-value]

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return self.decoder_layers(model)[index]

    def neuron_width(self, model: nn.Module, index: int) -> int:
        """Neurons of layer ``index``'s MLP (a mixture's: every expert's, then a shared
        expert's)."""
        layer = self.layer(model, index)
        return self.mlp.for_layer(layer).width(layer)

    def norms(self) -> list[tuple[str, NormPart]]:
        """The layer's norms as ``(role, part)``, those it has, in forward order."""
        found = ((role, getattr(self, role)) for role in NORM_ROLES)
        return [(role, part) for role, part in found if part is not None]

    @property
    def mlp_entry(self) -> str:
        """The first module of the MLP sub-block: its input is ``u^l`` (sequential layers)."""
        return self.mlp_norm.path if self.mlp_norm is not None else self.mlp.module

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm.path)

    def unembed(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.readout.path)

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_tokens)

    @property
    def frozen_norms(self) -> int:
        """Norms per layer whose (N, D) frozen scale propagation holds."""
        return len(self.norms())

    @property
    def post_norms(self) -> int:
        """Post-norms per layer (each holds an (N, D) bias term through it)."""
        return (self.attn_post_norm is not None) + (self.mlp_post_norm is not None)

    @property
    def attention_temporaries(self) -> int:
        """(.., D) temporaries per row and position beyond Llama's in an attention block:
        a post-norm's output, a LayerNorm's centred input."""
        centred = self.attn_norm is not None and self.attn_norm.centred
        return (self.attn_post_norm is not None) + centred

    @property
    def mlp_temporaries(self) -> int:
        """(.., D) temporaries per row and position beyond Llama's in an MLP chunk."""
        centred = self.mlp_norm is not None and self.mlp_norm.centred
        return (self.mlp_post_norm is not None) + centred + self.mlp.temporaries
