"""Former home of the architecture adapters, kept so that existing imports still work.

Families are now declarations of typed parts (:mod:`engine.families`, :mod:`engine.parts`);
``ArchitectureAdapter`` is :class:`engine.families.Family` and ``ADAPTERS`` the registry.
"""

from engine.families import FAMILIES as ADAPTERS
from engine.families import Family as ArchitectureAdapter
from engine.families import UnsupportedArchitectureError, supported_architectures
from engine.families import family_for as adapter_for
from engine.families import family_named as adapter_named

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "UnsupportedArchitectureError",
    "adapter_for",
    "adapter_named",
    "supported_architectures",
]
