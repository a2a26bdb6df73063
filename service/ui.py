"""The web viewer at ``/ui``: static files shipped inside the package.

Plain HTML, CSS and JavaScript modules (no build step, nothing fetched from the internet),
served by the app itself so that any deployment has the viewer. The files hold no data:
every request the page makes goes to ``/v1/*`` and carries the API key when the service
has one (the page asks for it once and keeps it for the browser tab's session).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

#: The viewer's files: index.html, the stylesheet and the JavaScript modules.
UI_DIR = Path(__file__).resolve().parent / "static" / "ui"

#: The browser loads nothing from another origin and runs no inline script; images from
#: ``blob:``/``data:`` URLs are the PNG export and the empty favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)


class ViewerFiles(StaticFiles):
    """The viewer's static files, each sent with :data:`CONTENT_SECURITY_POLICY`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the viewer at ``/ui/`` (``/ui`` redirects there, so relative links resolve)."""

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        # relative, so that it also holds behind a proxy that serves the app under a prefix
        return RedirectResponse("ui/", status_code=307)

    app.mount("/ui/", ViewerFiles(directory=UI_DIR, html=True), name="ui")
