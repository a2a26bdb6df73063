"""``python -m service``: read the ``DEPASS_*`` settings and serve them with uvicorn."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def main() -> int:
    """Start the service; exit code 2 for a configuration error."""
    from service.settings import ModelNotFoundError, Settings

    try:
        settings = Settings()
        settings.check_model_source()
    except ValidationError as exc:
        print(f"depass-serve: invalid DEPASS_* setting:\n{exc}", file=sys.stderr)
        return 2
    except ModelNotFoundError as exc:
        print(f"depass-serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
