"""One generation session for an asyncio caller (the HTTP API): the session machinery blocks (it waits for
the verifier and for draft passes), so it runs on a thread of its own, and its start and events are handed
to the caller's event loop.

The thread holds the session's lease in the ``SessionRegistry`` for the session's whole life, so HTTP and
gRPC sessions count against the same limit. ``leave()`` says the caller has gone: the session stops at its
next event and frees itself on both services, as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from duo.draft_service.session_factory import SessionFactory, SessionStart
from duo.common.events import GenerationEvent
from duo.common.generation_spec import GenerationSpec
from duo.common.sessions import SessionRegistry

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class SessionThread:
    def __init__(self, factory: SessionFactory, registry: SessionRegistry, spec: GenerationSpec,
                 received_at: float | None = None):
        """Start at once; call from the event loop that reads it."""
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._gone = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(factory, registry, spec, received_at),
                                        name=f"http-session-{spec.request_id}", daemon=True)
        self._thread.start()

    async def started(self) -> SessionStart:
        """How the session starts; raises the refusal (a DuoError) of a session that cannot be built."""
        return await self._next()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """The session's events until it ends (after its FinishedEvent, or early once the caller has left)."""
        while (item := await self._next()) is not _END:
            yield item

    def leave(self) -> None:
        """The caller has gone (or has read all it wants): end the session. Safe to call more than once."""
        self._gone.set()

    def _run(self, factory: SessionFactory, registry: SessionRegistry, spec: GenerationSpec,
             received_at: float | None) -> None:
        try:
            with registry.hold(self._gone.set) as lease:
                generation = factory.start(spec, lease, gone=self._gone.is_set, received_at=received_at)
                self._hand(generation.start)
                with contextlib.closing(generation.events) as events:
                    for event in events:
                        self._hand(event)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who turns it into an HTTP error
            if self._gone.is_set():
                log.info("session %s: the caller went away (%s)", spec.request_id, type(exc).__name__)
            self._hand(_Failure(exc))
        finally:
            self._hand(_END)

    def _hand(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the HTTP server stopped): nobody reads on
            self._gone.set()

    async def _next(self):
        item = await self._inbox.get()
        if isinstance(item, _Failure):
            raise item.error
        return item
