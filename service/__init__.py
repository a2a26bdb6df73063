"""DePass Serve: the HTTP attribution service (FastAPI) around :mod:`engine`.

Run it with ``python -m service``; build it in code with :func:`service.app.create_app`.
"""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
