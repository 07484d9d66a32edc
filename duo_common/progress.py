"""Progress of a service's long start-up steps (converting the default model, loading a model, waiting for the
peer service) as log lines: one every few seconds while a step runs, so a log, a terminal, or a client
relaying the last line (``duo-client``'s embedded mode) shows what the service is busy with.

transformers draws its own progress bars (loading weights, converting a GGUF); they suit a terminal, and in a
log file their redraws only pile up, so they are turned off when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Iterator

REPORT_EVERY_S = 5.0


@contextlib.contextmanager
def reported(log: logging.Logger, step: str, every_s: float = REPORT_EVERY_S) -> Iterator[None]:
    """Log 'still STEP (N s)' every ``every_s`` seconds until the block ends (the caller logs its start and
    its outcome)."""
    started = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(every_s):
            log.info("still %s (%.0f s)", step, time.monotonic() - started)

    reporter = threading.Thread(target=report, name="progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def hide_progress_bars_off_terminal() -> None:
    """Turn transformers' progress bars off unless stderr is a terminal."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
