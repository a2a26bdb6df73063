"""The bodies of ``/health`` and ``/ready``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness: the model is loaded."""

    status: Literal["ready"] = "ready"
    model: str
