"""A bounded registry of live sessions, shared by both services (TGI's cache.py, with a limit).

Sessions are registered for the life of their stream and always released, also on cancellation.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from duo_common.errors import ResourceExhausted


class SessionRegistry:
    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self.total_opened = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._live

    @contextlib.contextmanager
    def hold(self, session_id: str) -> Iterator[None]:
        """Register ``session_id`` for the duration of the block; refuse beyond the limit."""
        with self._lock:
            if len(self._live) >= self.max_sessions:
                raise ResourceExhausted(
                    f"this service already runs {self.max_sessions} sessions; retry later or on another replica"
                )
            if session_id in self._live:
                raise ResourceExhausted(f"session id {session_id!r} is already in use")
            self._live.add(session_id)
            self.total_opened += 1
        try:
            yield
        finally:
            with self._lock:
                self._live.discard(session_id)
