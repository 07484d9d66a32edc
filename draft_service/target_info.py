"""The verifier's model, asked once per connection instead of once per session.

Every session needs the target's limits (context, vocabulary, end tokens, tree limit); asking for them
before each prefill would put one more round trip in front of every first token. The answer is kept while
the channel stays connected and forgotten whenever it leaves READY (a restarted or replaced verifier comes
back on a new connection). Behind one address several replicas may answer: each session's stream also
carries the drafter's tokenizer fingerprint, which every verifier checks when the session opens.
"""

from __future__ import annotations

import threading
from typing import Callable

import grpc

from duo.common.models import ModelInfo


class TargetInfoCache:
    def __init__(self, channel: grpc.Channel, fetch: Callable[[], ModelInfo]):
        """``fetch`` asks the verifier (and checks the pair); it runs outside the lock."""
        self._fetch = fetch
        self._lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._connection = 0  # counts departures from READY; an answer fetched across one is not kept
        self._ready = False
        channel.subscribe(self._on_connectivity, try_to_connect=False)

    def get(self) -> tuple[ModelInfo, bool]:
        """The target's info, and whether it took a round trip to get it."""
        with self._lock:
            if self._info is not None:
                return self._info, False
            connection = self._connection
        info = self._fetch()
        with self._lock:
            if self._connection == connection:
                self._info = info
        return info, True

    def forget(self) -> None:
        """Ask again next time (e.g. after a session failed in a way a different verifier would explain)."""
        with self._lock:
            self._info = None
            self._connection += 1

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """Forget the answer when a connection ends (the first connection's setup ends none)."""
        if state is grpc.ChannelConnectivity.READY:
            self._ready = True
        elif self._ready:
            self._ready = False
            self.forget()
