"""A bounded registry of live sessions, shared by both services (TGI's cache.py, with a limit and a reaper).

Every stream is registered before its first message is read, for its whole life, and always released, also
on cancellation: so streams that open and send nothing count against the limit instead of quietly holding
the server's worker threads (which health checks and model-info calls need too). A session whose peer
leaves the service waiting for longer than ``idle_timeout_s`` (no opening, no next proposal, or its
responses not taken: a caller that stops reading blocks the stream's sends once the transport's window is
full) is cancelled, which frees its thread and, on the verifier, its KV cache.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Callable, Iterator

from duo.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

_END = object()


class Lease:
    """One registered session: says when the service waits for its peer, and cancels it when reaped."""

    def __init__(self, key: str, cancel: Callable[[], None]):
        self.key = key
        self.name = key  # what logs call it (the caller's id once known)
        self._cancel = cancel
        self.waiting_since: float | None = None  # the service waits for the peer's next message since then
        self.reaped = False

    def messages(self, requests: Iterator) -> Iterator:
        """The peer's messages, with the waits for each one watched."""
        while True:
            self.waiting_since = time.monotonic()
            try:
                message = next(requests, _END)
            finally:
                self.waiting_since = None
            if message is _END:
                return
            yield message

    def delivered(self, responses: Iterator) -> Iterator:
        """``responses``, each handed to the transport with the wait for the peer to take it watched: gRPC
        resumes a streaming handler only once its last message is sent, which a peer that stopped reading
        holds up for good."""
        try:
            for response in responses:
                self.waiting_since = time.monotonic()
                try:
                    yield response
                finally:
                    self.waiting_since = None
        finally:
            close = getattr(responses, "close", None)
            if close is not None:  # a generator's cleanup runs now, not whenever it is collected
                close()

    def reap(self) -> None:
        self.reaped = True
        self._cancel()


class SessionRegistry:
    def __init__(self, max_sessions: int, idle_timeout_s: float | None = None):
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._live: dict[str, Lease] = {}
        self.total_opened = 0
        self.total_reaped = 0
        if idle_timeout_s is not None:
            threading.Thread(target=self._reap_forever, name="session-reaper", daemon=True).start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    @contextlib.contextmanager
    def hold(self, cancel: Callable[[], None] = lambda: None) -> Iterator[Lease]:
        """Register a session for the duration of the block (refused beyond the limit); ``cancel`` ends its
        call when it is reaped."""
        lease = Lease(uuid.uuid4().hex, cancel)
        with self._lock:
            if len(self._live) >= self.max_sessions:
                raise ResourceExhausted(
                    f"this service already runs {self.max_sessions} sessions; retry later or on another replica"
                )
            self._live[lease.key] = lease
            self.total_opened += 1
        try:
            yield lease
        finally:
            with self._lock:
                self._live.pop(lease.key, None)

    def reap_idle(self, now: float | None = None) -> list[Lease]:
        """Cancel the sessions whose peer has kept the service waiting longer than the idle timeout."""
        if self.idle_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [lease for lease in self._live.values() if not lease.reaped and lease.waiting_since is not None
                    and now - lease.waiting_since > self.idle_timeout_s]
            self.total_reaped += len(idle)
        for lease in idle:
            log.warning("session %s: its peer kept it waiting for %.0f s (sent nothing, or took nothing); closing it",
                        lease.name, self.idle_timeout_s)
            lease.reap()
        return idle

    def _reap_forever(self) -> None:
        interval = min(1.0, self.idle_timeout_s / 4)
        while True:
            time.sleep(interval)
            self.reap_idle()
