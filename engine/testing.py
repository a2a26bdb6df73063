"""Tiny random models and a word-level tokenizer, built in-process for tests and demos.

Nothing here downloads anything: configs are written out, weights are drawn from a
seeded generator, and the tokenizer is a ``tokenizers`` WordLevel model over a word list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from engine.families import family_called
from engine.families.base import TINY_DEFAULTS, TINY_SPECIAL_IDS

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

    ids = TINY_SPECIAL_IDS
    vocab = {"<unk>": 0, "<s>": ids["bos_token_id"], "</s>": ids["eos_token_id"]}
    vocab["<pad>"] = ids["pad_token_id"]
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
    bias_std: float | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A small random causal LM of the registered family called ``family``, built from
    its declared :class:`~engine.families.base.TinyConfig`, with eager attention, in
    float32.

    Norm gains are drawn around 1 (so a Gemma ``(1 + w)`` gain is around 2, far from
    ``w``) and every bias (Qwen2's q/k/v, GPT-2's LayerNorms and projections) with
    ``bias_std`` (default: the family's), so that bias handling is exercised.
    ``overrides`` are config values over the family's.
    """
    import transformers

    declared = family_called(family)
    tiny = declared.tiny
    model_class = getattr(transformers, declared.architectures[0])
    settings: dict[str, Any] = {
        name: value for name, value in TINY_DEFAULTS.items() if name not in tiny.without
    }
    settings.update(vocab_size=vocab_size, tie_word_embeddings=False, attn_implementation="eager")
    settings.update(tiny.settings)
    settings.update(overrides)
    config = model_class.config_class(**settings)
    bias_std = tiny.bias_std if bias_std is None else bias_std
    torch.manual_seed(seed)
    model = model_class(config).eval()
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
