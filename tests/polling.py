"""Waiting in tests for something another thread or process does."""

import time


def eventually(condition, timeout_s: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout_s`` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
