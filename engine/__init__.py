"""DePass decomposition engine (arXiv 2510.18462): exact additive attributions for causal LMs."""

from engine.cost import TimeBudgetError
from engine.engine import DePassEngine
from engine.families import (
    Family,
    UnsupportedArchitectureError,
    register,
    supported_architectures,
)
from engine.info import ModelInfo
from engine.memory import MemoryBudgetError, MemoryEstimate
from engine.plan import Plan
from engine.propagate import Cancelled
from engine.request import AttributionRequest, RequestError
from engine.result import AttributionResult
from engine.splits import SPLIT_RULES

__all__ = [
    "SPLIT_RULES",
    "AttributionRequest",
    "AttributionResult",
    "Cancelled",
    "DePassEngine",
    "Family",
    "MemoryBudgetError",
    "MemoryEstimate",
    "ModelInfo",
    "Plan",
    "RequestError",
    "TimeBudgetError",
    "UnsupportedArchitectureError",
    "register",
    "supported_architectures",
]
