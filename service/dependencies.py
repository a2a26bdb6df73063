"""Route dependencies: the loaded model's serving layer, the settings, the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import AuthenticationError, NotReadyError
from service.serving import Serving
from service.settings import Settings

_bearer = HTTPBearer(
    auto_error=False,
    description="Required on /v1/* when the service has DEPASS_API_KEY set.",
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


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[Serving, Depends(get_serving)]


def verify_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With ``DEPASS_API_KEY`` set, require ``Authorization: Bearer <key>`` (constant time)."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise AuthenticationError(
            "this service requires an API key: send the header 'Authorization: Bearer <key>'"
        )
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise AuthenticationError("the API key is not valid")
