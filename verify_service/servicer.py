"""The Verifier gRPC servicer: a thin layer between protobuf and the scheduler that runs every session's work
on the TargetVerifier."""

from __future__ import annotations

import logging
from typing import Iterator

import grpc

from duo.common import codec
from duo.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from duo.common.limits import checked_token_ids
from duo.common.metrics import ServiceMetrics
from duo.common.rpc import translate_errors
from duo.common.sessions import Lease, SessionRegistry
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from duo.verify_service.scheduler import VerifyScheduler

log = logging.getLogger(__name__)


class VerifierServicer(duo_pb2_grpc.VerifierServicer):
    def __init__(self, sessions: SessionRegistry, metrics: ServiceMetrics | None = None):
        self._loaded: VerifyScheduler | None = None
        self._sessions = sessions
        self._metrics = metrics or ServiceMetrics()

    def attach(self, scheduler: VerifyScheduler) -> None:
        """Start serving with a loaded model (the server is up, answering UNAVAILABLE, while it loads)."""
        self._loaded = scheduler

    @property
    def _scheduler(self) -> VerifyScheduler:
        if self._loaded is None:
            raise Unavailable("the target model is still loading; retry shortly")
        return self._loaded

    @translate_errors
    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return codec.model_info_to_pb(self._scheduler.verifier.info)

    @translate_errors
    def Verify(self, request_iterator: Iterator[pb.VerifyRequest],
               context: grpc.ServicerContext) -> Iterator[pb.VerifyResponse]:
        scheduler = self._scheduler
        with self._sessions.hold(context.cancel) as lease:  # before the opening: a silent stream counts too
            yield from lease.delivered(self._verify(scheduler, lease, lease.messages(request_iterator), context))

    def _verify(self, scheduler: VerifyScheduler, lease: Lease, messages: Iterator[pb.VerifyRequest],
                context: grpc.ServicerContext) -> Iterator[pb.VerifyResponse]:
        opening = next(messages, None)
        if opening is None or opening.WhichOneof("message") != "open":
            raise FailedPrecondition("a Verify stream must start with VerifyOpen")
        # The caller's id is only for logs (the registry has keys of its own: two callers may send one id).
        session_id = lease.name = codec.request_id_from_pb(opening.open.session_id) or lease.key
        info = scheduler.verifier.info
        vocab_size = info.vocab_size
        expected = opening.open.draft_tokenizer_fingerprint
        if expected and expected != info.tokenizer_fingerprint:
            raise FailedPrecondition(
                f"this verifier runs {info.model_name!r}, whose tokenizer differs from the drafter's; "
                "the drafter must speculate with a model that shares the target's tokenizer"
            )
        prompt = checked_token_ids(opening.open.prompt_token_ids, vocab_size, "prompt")
        params = codec.decoding_from_pb(opening.open.decoding)
        metrics = self._metrics
        with metrics.sessions_active.track_inprogress():
            metrics.sessions_total.inc()
            gone = lambda: not context.is_active()  # noqa: E731 - a cancelled stream's work is dropped
            prefill = scheduler.prefill(scheduler.verifier.new_session(prompt, params), gone)
            metrics.prefill_seconds.observe(prefill.compute_s)
            log.info("session %s: prefilled %d tokens in %.3f s", session_id, len(prompt), prefill.compute_s)
            yield pb.VerifyResponse(prefilled=pb.Prefilled(first_token_id=prefill.first_token, compute_s=prefill.compute_s,
                                                           queue_s=prefill.queue_s))
            expected_round = 1
            try:
                for request in messages:
                    if request.WhichOneof("message") != "proposal":
                        raise FailedPrecondition(f"session {session_id}: expected a Proposal, got {request.WhichOneof('message')}")
                    if request.proposal.round != expected_round:
                        raise InvalidArgument(
                            f"session {session_id}: expected round {expected_round}, got {request.proposal.round}"
                        )
                    tree = codec.tree_from_pb(request.proposal.tree, vocab_size, info.max_tree_nodes)
                    outcome = scheduler.verify(prefill.session, tree, gone)
                    metrics.record_verdict(len(tree), len(outcome.acceptance.accepted_nodes), outcome.compute_s)
                    yield pb.VerifyResponse(verdict=pb.Verdict(
                        round=expected_round,
                        accepted_node_indices=list(outcome.acceptance.accepted_nodes),
                        next_token_id=outcome.acceptance.next_token,
                        compute_s=outcome.compute_s,
                        batch_sessions=outcome.batch_sessions,
                        batch_tokens=outcome.batch_tokens,
                        queue_s=outcome.queue_s,
                    ))
                    expected_round += 1
            finally:  # also when the drafter cancels the stream (a session it abandons) or it is reaped
                scheduler.forget(prefill.session)
                log.info("session %s: ended after %d rounds", session_id, expected_round - 1)
