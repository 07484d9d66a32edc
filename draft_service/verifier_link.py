"""The drafter's connection to a verify service for one session: a bidirectional gRPC stream.

Requests go through a queue the gRPC call consumes; responses are read by a background thread into an
inbox, so the drafter can keep drafting and only look (``verdict_ready``) between draft steps.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import grpc

from duo.common import codec
from duo.common.errors import FailedPrecondition, Unavailable
from duo.common.keepalive import connection_lost, wait_connected
from duo.common.params import DecodingParams
from duo.common.tree import TokenTree
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc

_CLOSE = object()


class VerifierLost(Unavailable):
    """The session's verifier went away (connection lost, stream ended without an answer, or silence past the
    timeout): the session may carry on with a new verifier session (``SpeculativeSession``)."""


@dataclass(frozen=True)
class VerdictReply:
    round: int
    accepted_nodes: tuple[int, ...]
    next_token: int
    compute_s: float
    round_trip_s: float  # drafter-measured, send to receipt
    batch_sessions: int = 0  # sessions and tokens of the verifier's pass (0: not said)
    batch_tokens: int = 0
    queue_s: float = 0.0  # of round_trip_s, the wait at the verifier for that pass


@dataclass(frozen=True)
class PrefillReply:
    first_token: int
    compute_s: float  # the verifier's prefill passes
    queue_s: float = 0.0  # the verifier's wait for those passes
    waited_s: float = 0.0  # drafter-measured, session opened to first token received


class GrpcVerifierLink:
    def __init__(self, channel: grpc.Channel, timeout_s: float, metadata: tuple = (), draft_fingerprint: str = ""):
        """``draft_fingerprint``: the drafter's tokenizer fingerprint, which the verifier checks at the opening."""
        self._channel = channel
        self._stub = duo_pb2_grpc.VerifierStub(channel)
        self._timeout_s = timeout_s
        self._metadata = metadata
        self._draft_fingerprint = draft_fingerprint
        self._opened_at = 0.0
        self._requests: queue.Queue = queue.Queue()
        self._inbox: queue.Queue = queue.Queue()
        self._sent_at: dict[int, float] = {}
        self._call = None
        self._reader: threading.Thread | None = None

    def wait_connected(self, timeout_s: float) -> bool:
        """Until the verifier listens (one that restarts closes its port for a while), at most ``timeout_s``."""
        return wait_connected(self._channel, timeout_s)

    def open(self, session_id: str, prompt: tuple[int, ...], params: DecodingParams) -> None:
        """Start the session; the verifier prefills and its first token arrives via ``wait_prefill``."""
        self._opened_at = time.perf_counter()
        self._requests.put(pb.VerifyRequest(open=pb.VerifyOpen(
            session_id=session_id, prompt_token_ids=list(prompt), decoding=codec.decoding_to_pb(params),
            draft_tokenizer_fingerprint=self._draft_fingerprint)))
        self._call = self._stub.Verify(iter(self._requests.get, _CLOSE), metadata=self._metadata)
        self._reader = threading.Thread(target=self._read, name=f"verify-reader-{session_id}", daemon=True)
        self._reader.start()

    def wait_prefill(self) -> PrefillReply:
        response = self._receive()
        waited_s = time.perf_counter() - self._opened_at
        if response.WhichOneof("message") != "prefilled":
            raise FailedPrecondition("the verify service did not answer the session opening with its first token")
        prefilled = response.prefilled
        return PrefillReply(prefilled.first_token_id, prefilled.compute_s, prefilled.queue_s, waited_s)

    def send(self, round_number: int, tree: TokenTree) -> None:
        self._sent_at[round_number] = time.perf_counter()
        self._requests.put(pb.VerifyRequest(proposal=pb.Proposal(round=round_number, tree=codec.tree_to_pb(tree))))

    def verdict_ready(self) -> bool:
        return not self._inbox.empty()

    def wait_verdict(self) -> VerdictReply:
        response = self._receive()
        received_at = time.perf_counter()
        if response.WhichOneof("message") != "verdict":
            raise FailedPrecondition("the verify service answered a proposal without a verdict")
        verdict = response.verdict
        return VerdictReply(
            round=verdict.round,
            accepted_nodes=tuple(verdict.accepted_node_indices),
            next_token=verdict.next_token_id,
            compute_s=verdict.compute_s,
            round_trip_s=received_at - self._sent_at.pop(verdict.round, received_at),
            batch_sessions=verdict.batch_sessions,
            batch_tokens=verdict.batch_tokens,
            queue_s=verdict.queue_s,
        )

    def close(self, cancel: bool = True) -> None:
        """End the stream (the verifier frees the session); safe to call more than once. A session that
        ended normally only half-closes it, so the verifier ends it with OK; ``cancel`` also drops whatever
        of this session the verifier still has queued."""
        self._requests.put(_CLOSE)
        if cancel and self._call is not None:
            self._call.cancel()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._inbox.put(response)
        except grpc.RpcError as exc:
            self._inbox.put(exc)
        self._inbox.put(None)

    def _receive(self) -> pb.VerifyResponse:
        try:
            item = self._inbox.get(timeout=self._timeout_s)
        except queue.Empty:
            raise VerifierLost(f"the verify service sent nothing for {self._timeout_s:.0f} s") from None
        if isinstance(item, grpc.RpcError):
            if connection_lost(item):
                raise VerifierLost(f"verify service: {item.code().name}: {item.details()}") from item
            raise item
        if item is None:
            raise VerifierLost("the verify service closed the session stream")
        return item
