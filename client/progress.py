"""What ``duo-client`` says on stderr while it waits for services to start (minutes at worst: the first run
converts the default target): on a terminal, one status line rewritten in place; elsewhere (a log, a pipe),
a plain line every few seconds. ``--quiet`` says nothing."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

PLAIN_EVERY_S = 5.0  # between two plain lines
TERMINAL_EVERY_S = 0.5  # between two redraws of the status line


class StartProgress:
    """Reports a wait: ``update(status)`` as often as convenient (``status`` is only called when a line is
    due), ``finish()`` at its end. A ``hint`` is said once, before the first report (a wait too short to
    report says nothing)."""

    def __init__(self, what: str, stream: TextIO | None = None, quiet: bool = False, hint: str | None = None):
        self.what = what  # e.g. "starting the services"
        self._hint = hint
        self._stream = stream if stream is not None else sys.stderr
        self._quiet = quiet
        self._terminal = not quiet and _is_terminal(self._stream)
        self._started = time.monotonic()
        self._next_at = self._started + (TERMINAL_EVERY_S if self._terminal else PLAIN_EVERY_S)
        self._drawn = False  # a status line is on the terminal

    def update(self, status: Callable[[], str]) -> None:
        now = time.monotonic()
        if self._quiet or now < self._next_at:
            return
        if self._hint is not None:
            self._stream.write(f"duo: {self._hint}\n")
            self._hint = None
        line = f"duo: {self.what} ({now - self._started:.0f} s): {status()}"
        if self._terminal:
            width = shutil.get_terminal_size().columns
            self._stream.write("\r\x1b[K" + line[:width - 1])
            self._drawn = True
            self._next_at = now + TERMINAL_EVERY_S
        else:
            self._stream.write(line + "\n")
            self._next_at = now + PLAIN_EVERY_S
        self._stream.flush()

    def finish(self) -> None:
        """Clear the status line (a terminal keeps no trace of the wait)."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
