"""``python -m service``: read the ``DEPASS_*`` settings and serve them with uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
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
    taken = port_taken(settings.host, settings.port)
    if taken is not None:  # found now, not after minutes of loading a big model
        print(f"depass-serve: {taken}", file=sys.stderr)
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


def port_taken(host: str, port: int) -> str | None:
    """Why the service cannot listen on ``host:port`` (in use, or not an address of this
    machine), or None when it can: tried with a bind that is released at once."""
    if port == 0:
        return None
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} on {host} is already in use (another service is listening "
                "there); stop it or set DEPASS_PORT to a free port"
            )
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}; check DEPASS_HOST"
    return None


if __name__ == "__main__":
    sys.exit(main())
