"""The registry of model families, keyed by Hugging Face architecture name.

Each family is one declaration in its own file of this package, a module-level
``FAMILY`` (:class:`engine.families.base.Family`: its parts and its tiny test model),
found at import: a new family is one new file, with no list to edit. :func:`register`
adds one from outside the package, e.g. a fine-tuned variant under its own architecture
name.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

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


def _discover() -> None:
    """Register the ``FAMILY`` of every module of this package (``base`` excepted):
    adding a family is adding its file."""
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(f"{module.__name__} declares no FAMILY (an engine Family)")
        register(family)


_discover()


def family_names() -> list[str]:
    """The short names of the registered families (``llama``, ``gemma3``...), sorted."""
    return sorted({family.name for family in FAMILIES.values()})


def family_called(name: str) -> Family:
    """The registered family whose short name is ``name``.

    Raises:
        KeyError: none is; the message lists the names.
    """
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise KeyError(f"no family called {name!r}; registered: {', '.join(family_names())}")


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
    "family_called",
    "family_for",
    "family_named",
    "family_names",
    "register",
    "supported_architectures",
]
