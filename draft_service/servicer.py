"""The Drafter gRPC servicer: Session (client-steered), Generate (public) and GetModelInfo.

Thin: it holds the call's lease, decodes the request (``codec``), has the ``SessionFactory`` build and run the
session, and encodes its events as protobuf. The HTTP API calls the same factory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import grpc

from duo.draft_service.session_budget import SessionBudget
from duo.draft_service.session_factory import DrafterConfig, Generation, SessionFactory, SessionStart
from duo.common import codec
from duo.common.errors import FailedPrecondition, InvalidArgument
from duo.common.metrics import ServiceMetrics
from duo.common.models import LoadedModel, ModelInfo
from duo.common.rpc import translate_errors
from duo.common.sessions import Lease, SessionRegistry
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc

__all__ = ["DrafterConfig", "DrafterServicer"]  # DrafterConfig: where callers have always imported it from

log = logging.getLogger(__name__)


class DrafterServicer(duo_pb2_grpc.DrafterServicer):
    def __init__(self, config: DrafterConfig, verify_channel: grpc.Channel, sessions: SessionRegistry,
                 metrics: ServiceMetrics | None = None, verify_metadata: tuple = ()):
        self.factory = SessionFactory(config, verify_channel, metrics, verify_metadata)
        self._sessions = sessions

    def attach(self, loaded: LoadedModel) -> None:
        self.factory.attach(loaded)

    def close(self) -> None:
        """Stop the draft passes (after the server has stopped)."""
        self.factory.close()

    def target_info(self) -> ModelInfo:
        return self.factory.target_info()

    @translate_errors
    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return codec.model_info_to_pb(self.factory.model().info)

    @translate_errors
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        with self._sessions.hold(context.cancel) as lease:
            generation = self._start(request, context, lease)
            yield from lease.delivered(_events_pb(generation))  # a caller that stops reading is reaped

    @translate_errors
    def Session(self, request_iterator: Iterator[pb.SessionRequest],
                context: grpc.ServicerContext) -> Iterator[pb.GenerateEvent]:
        with self._sessions.hold(context.cancel) as lease:  # before the opening: a silent stream counts too
            opening = next(lease.messages(request_iterator), None)
            if opening is None or opening.WhichOneof("message") != "start":
                raise FailedPrecondition("a Session stream must start with a GenerateRequest")
            generation = self._start(opening.start, context, lease)
            threading.Thread(target=_follow_budget_updates, args=(request_iterator, generation.budget),
                             daemon=True).start()
            yield from lease.delivered(_events_pb(generation))  # a caller that stops reading is reaped

    def _start(self, request: pb.GenerateRequest, context: grpc.ServicerContext, lease: Lease) -> Generation:
        return self.factory.start(codec.generation_spec_from_pb(request), lease, gone=lambda: not context.is_active())


def _events_pb(generation: Generation) -> Iterator[pb.GenerateEvent]:
    with contextlib.closing(generation.events) as events:  # a call that ends early ends the session at once
        yield pb.GenerateEvent(started=_started_pb(generation.start))
        for event in events:
            yield codec.event_to_pb(event)


def _started_pb(start: SessionStart) -> pb.Started:
    budget = pb.DraftBudget(max_draft_tokens=start.draft_budget, max_branches=start.max_branches)
    return pb.Started(request_id=start.request_id, prompt_tokens=start.prompt_tokens, budget=budget)


def _follow_budget_updates(request_iterator: Iterator[pb.SessionRequest], budget: SessionBudget) -> None:
    """Apply the client's BudgetUpdate messages until it half-closes or the call ends."""
    try:
        for request in request_iterator:
            if request.WhichOneof("message") == "budget":
                try:
                    budget.from_client(request.budget.budget.max_draft_tokens, request.budget.budget.max_branches)
                except InvalidArgument as exc:
                    log.warning("ignoring budget update: %s", exc)
    except grpc.RpcError:
        pass  # the call ended; the session notices on its own
