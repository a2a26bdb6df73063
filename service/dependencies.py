"""Route dependencies: the loaded model's serving layer (the shared one, or an endpoint's,
:func:`serving_of`), the settings, the bearer scheme.

The API key itself is checked by :class:`service.middleware.ApiKeyMiddleware`, before any
body is read; :data:`bearer_scheme` only declares it in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.errors import NotReadyError
from service.serving import Serving
from service.settings import Settings

S = TypeVar("S", bound=Serving)

#: Declares ``Authorization: Bearer <key>`` in the OpenAPI document (enforcement: middleware).
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="Required on /v1/* when the service has DEPASS_API_KEY set (and on /metrics "
    "with DEPASS_PROTECT_METRICS).",
)


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_serving(request: Request) -> Serving:
    """The serving layer of the loaded model; 503 until the model is loaded."""
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise NotReadyError()
    return serving


def serving_of(kind: type[S]) -> Callable[[Request], S]:
    """The dependency that gives a route its endpoint's serving layer, ``kind`` (one per
    loaded model, sharing its engine, worker and metrics); 503 until the model is loaded."""

    def get_endpoint_serving(request: Request) -> S:
        return get_serving(request).endpoint(kind)

    return get_endpoint_serving


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[Serving, Depends(get_serving)]
