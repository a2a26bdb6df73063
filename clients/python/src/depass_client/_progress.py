"""A dependency-free progress bar on stderr, for :meth:`Client.attribute_many`."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``label [#####-----] 12/40 30% 3.1/s``, redrawn in place on a terminal.

    Off a terminal (a log file, CI) it writes one line when done, not one per step.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        label: str = "attributions",
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.label = label
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self.done += n
        if self.live:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        """Finish the bar's line."""
        if self.enabled:
            self.stream.write(("\r" if self.live else "") + self._line() + "\n")
            self.stream.flush()

    def _line(self, width: int = 30) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = round(width * frac)
        rate = self.done / max(time.monotonic() - self._start, 1e-9)
        bar = "#" * filled + "-" * (width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {frac:4.0%} {rate:.1f}/s"
