"""The error every request check raises: it names the field at fault (HTTP: a 4xx whose
``param`` is that field)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that does not fit the loaded model; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
