"""The registry of model families, keyed by Hugging Face architecture name.

Each family is one declaration in its own file (:class:`engine.families.base.Family`);
:func:`register` adds one from outside the package, e.g. a fine-tuned variant under its
own architecture name.
"""

from __future__ import annotations

from torch import nn

from engine.families import (
    gemma,
    gemma2,
    gemma3,
    gpt2,
    gpt_neox,
    llama,
    mistral,
    mixtral,
    olmo2,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from engine.families.base import Family


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no family."""


#: Families keyed by ``config.architectures[0]``.
FAMILIES: dict[str, Family] = {}


def register(family: Family, replace: bool = False) -> Family:
    """Serve ``family``'s architectures with it (``replace``: over an existing one).

    Raises:
        ValueError: an architecture already has a family and ``replace`` is false.
    """
    taken = [name for name in family.architectures if name in FAMILIES]
    if taken and not replace:
        raise ValueError(f"architectures {taken} already have a family; pass replace=True")
    for name in family.architectures:
        FAMILIES[name] = family
    return family


for _module in (
    llama,
    mistral,
    qwen2,
    qwen3,
    gemma,
    gemma2,
    gemma3,
    olmo2,
    phi3,
    gpt2,
    gpt_neox,
    mixtral,
    qwen2_moe,
    qwen3_moe,
):
    register(_module.FAMILY)


def supported_architectures() -> list[str]:
    """Names of the Hugging Face architectures the engine supports."""
    return sorted(FAMILIES)


def family_for(model: nn.Module) -> Family:
    """The family of ``model``, found from its config or class name.

    Raises:
        UnsupportedArchitectureError: none; the message lists the supported ones.
    """
    config = getattr(model, "config", None)
    declared = list(getattr(config, "architectures", None) or [])
    return family_named([*declared, type(model).__name__])


def family_named(names: list[str]) -> Family:
    """The family of the first of ``names`` (HF architecture names) that has one.

    Raises:
        UnsupportedArchitectureError: none has; the message lists the supported ones.
    """
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names[0] if names else None!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


__all__ = [
    "FAMILIES",
    "Family",
    "UnsupportedArchitectureError",
    "family_for",
    "family_named",
    "register",
    "supported_architectures",
]
