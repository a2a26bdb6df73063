"""Where the endpoints' routes are included: one line per endpoint subpackage.

Each endpoint is a subpackage of :mod:`service.endpoints` whose ``api_router.py`` holds its
routes as ``router`` (on :func:`service.routing.v1_router` or
:func:`service.routing.ops_router`); listing it in :data:`ENDPOINTS` serves it. The order
is the order of the OpenAPI document.
"""

from __future__ import annotations

from importlib import import_module

from fastapi import APIRouter

#: The endpoint subpackages of :mod:`service.endpoints`, in the API document's order.
ENDPOINTS = ("ops", "attributions", "generate", "tokenize", "next_tokens", "model")


def build_router() -> APIRouter:
    """One router holding every endpoint's routes."""
    router = APIRouter()
    for name in ENDPOINTS:
        router.include_router(import_module(f"service.endpoints.{name}.api_router").router)
    return router


router = build_router()
