"""The interactive API pages, ``/docs`` (Swagger UI) and ``/redoc``, served offline.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they are blank on a host
without internet (many GPU hosts). The same pages here load them from the service itself:
the assets come from the ``fastapi-offline`` package (a PyPI wheel that ships the Swagger
UI and ReDoc bundles) and are served under :data:`ASSETS_PATH`, apart from the web
viewer's ``/ui``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

#: Where the Swagger UI and ReDoc bundles are served.
ASSETS_PATH = "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))


#: Builds a page from the OpenAPI document's URL and a function giving an asset's URL.
Page = Callable[[str, Callable[[str], str]], HTMLResponse]


def add_docs_pages(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve ``docs_url`` and ``redoc_url`` with assets of this service (no CDN)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    swagger: Page = lambda spec, asset: get_swagger_ui_html(  # noqa: E731
        openapi_url=spec,
        title=f"{app.title} - Swagger UI",
        swagger_js_url=asset("swagger-ui-bundle.js"),
        swagger_css_url=asset("swagger-ui.css"),
        swagger_favicon_url=asset("favicon.png"),
    )
    redoc: Page = lambda spec, asset: get_redoc_html(  # noqa: E731
        openapi_url=spec,
        title=f"{app.title} - ReDoc",
        redoc_js_url=asset("redoc.standalone.js"),
        redoc_favicon_url=asset("favicon.png"),
        with_google_fonts=False,
    )
    for path, page in ((docs_url, swagger), (redoc_url, redoc)):
        app.add_api_route(
            path, _route(page, app.openapi_url or "/openapi.json"), include_in_schema=False
        )


def _route(page: Page, openapi_url: str) -> Callable[[Request], Awaitable[HTMLResponse]]:
    """The handler of one page; URLs honour the ASGI ``root_path`` (behind a proxy)."""

    async def handler(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return page(f"{root}{openapi_url}", lambda name: f"{root}{ASSETS_PATH}/{name}")

    return handler
