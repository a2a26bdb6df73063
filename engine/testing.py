"""Tiny random models and a word-level tokenizer, built in-process for tests and demos.

Nothing here downloads anything: configs are written out, weights are drawn from a
seeded generator, and the tokenizer is a ``tokenizers`` WordLevel model over a word list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

#: Config names that differ from Llama's (GPT-2's), and settings a family needs to build
#: at this size (special token ids inside the small vocabulary).
_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "gpt2": {
        "n_embd": 32,
        "n_inner": 48,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt_neox": {"layer_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "rotary_pct": 0.5},
    "phi3": {"pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2},
    "olmo2": {"pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2},
    "gemma": {"pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2},
    "gemma2": {"pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2},
    "gemma3": {"pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2},
    # four experts of 16 neurons, two chosen per position
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
_LLAMA_NAMES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
)

WORDS: tuple[str, ...] = tuple(
    (
        "the a of to and in is was on for with as by at from that it he she they we capital "
        "city country France Paris Rome Italy Berlin Germany Spain Madrid Mary John Anna "
        "Peter store park school market gave drink book ball went when then after located "
        "continent Europe Asia Africa river mountain red blue green old new"
    ).split()
)


def word_tokenizer(words: Sequence[str] = WORDS, bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer; ``bos`` prepends ``<s>`` like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tiny_model(
    family: str = "llama",
    seed: int = 0,
    vocab_size: int = 96,
    bias_std: float = 0.1,
    **overrides: Any,
) -> PreTrainedModel:
    """A small random causal LM of ``family`` with eager attention, in float32.

    Defaults follow the Hugging Face model testers: hidden 32, 2 layers, GQA 4/2, MLP 48.
    Norm gains are drawn around 1 (so a Gemma ``(1 + w)`` gain is around 2, far from
    ``w``) and every bias (Qwen2's q/k/v, GPT-2's LayerNorms and projections) with
    ``bias_std``, so that bias handling is exercised.
    """
    import transformers

    config_name, model_name = FAMILIES[family]
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }
    if family == "gpt2":  # its own names; no GQA
        settings = {k: v for k, v in settings.items() if k not in _LLAMA_NAMES}
    if family == "gpt_neox":  # no GQA, LayerNorm
        for name in ("num_key_value_heads", "head_dim", "rms_norm_eps"):
            settings.pop(name)
    settings.update(_FAMILY_CONFIG.get(family, {}))
    settings.update(overrides)
    config = getattr(transformers, config_name)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_norm(name) and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(bias_std * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def _is_norm(name: str) -> bool:
    """A norm's parameter (``..._layernorm.weight``, ``q_norm.weight``, GPT-2's ``ln_1``)."""
    module = name.rsplit(".", 2)[-2]
    return "norm" in module or module.startswith("ln_")
