"""The Drafter gRPC servicer: Session (client-steered), Generate (public) and GetModelInfo.

Thin: it decodes the request, checks the draft/target pair, builds a SpeculativeSession and turns its
events into protobuf. The loop itself lives in ``speculation``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass

import grpc

from draft_service.draft_tree import MAX_WIDTH
from draft_service.prompts import PromptEncoder
from draft_service.speculation import SessionPlan, SpeculativeSession
from draft_service.target_info import TargetInfoCache
from draft_service.tree_drafter import TreeDrafter
from draft_service.verifier_link import GrpcVerifierLink
from duo_common import batched_forward, codec
from duo_common.compat import check_compatible
from duo_common.decoder_ops import SHORT_QUERY_TOKENS
from duo_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from duo_common.events import CommittedEvent, FirstTokenTimes, GenerationEvent
from duo_common.metrics import ServiceMetrics
from duo_common.models import LoadedModel, ModelInfo
from duo_common.pass_scheduler import PassScheduler
from duo_common.rpc import translate_errors
from duo_common.sessions import Lease, SessionRegistry
from duo_common.stopping import StopChecker
from duo_common.tree import DEFAULT_MAX_BRANCHES
from duo_common.tree_attention import supports_tree_attention
from protos import duo_pb2 as pb
from protos import duo_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrafterConfig:
    default_budget: int = 4
    default_max_branches: int = DEFAULT_MAX_BRANCHES  # tree width when a request sets no budget (1: chains)
    context_copy: bool = True  # mix copies from the context into the draft's distributions (context_copy.py)
    verify_timeout_s: float = 120.0
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int | None = None  # None: whatever the target's context holds
    max_batch_tokens: int = 256  # draft forwards of all sessions share passes (duo_common.pass_scheduler)
    max_batch_sessions: int = 64
    draft_prefill_first: bool = True  # prefill the draft beside the target (False: after the first token)


class BudgetHolder:
    """The current draft budget (tokens, and tree width) of one session; the client may change it between rounds."""

    def __init__(self, initial: int, limit: int, max_branches: int = 1):
        self._limit = limit
        self._value = self._checked(initial)
        self._branches = _checked_branches(max_branches)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self._value

    def max_branches(self) -> int:
        with self._lock:
            return self._branches

    def update(self, value: int, max_branches: int | None = None) -> None:
        checked = self._checked(value)
        branches = self._branches if max_branches is None else _checked_branches(max_branches)
        with self._lock:
            self._value, self._branches = checked, branches

    def _checked(self, value: int) -> int:
        if not 0 <= value <= self._limit:
            raise InvalidArgument(f"draft budget {value} is outside [0, {self._limit}] (the verifier's tree limit)")
        return value


def _checked_branches(value: int) -> int:
    """max_branches 0 and 1 both mean chains."""
    if not 0 <= value <= MAX_WIDTH:
        raise InvalidArgument(f"max_branches {value} is outside [0, {MAX_WIDTH}]")
    return max(value, 1)


class DrafterServicer(duo_pb2_grpc.DrafterServicer):
    def __init__(self, config: DrafterConfig, verify_channel: grpc.Channel, sessions: SessionRegistry,
                 metrics: ServiceMetrics | None = None, verify_metadata: tuple = ()):
        self._config = config
        self._verify_channel = verify_channel
        self._verify_metadata = verify_metadata  # e.g. the bearer token the verifier expects
        self._metrics = metrics or ServiceMetrics("draft")
        self._verifier_stub = duo_pb2_grpc.VerifierStub(verify_channel)
        self._sessions = sessions
        self._loaded: LoadedModel | None = None
        self._encoder: PromptEncoder | None = None
        self._tree_attention = False  # whether the draft model takes a tree attention mask
        self._passes: PassScheduler | None = None
        self._targets = TargetInfoCache(verify_channel, self._ask_target_info)

    def attach(self, loaded: LoadedModel) -> None:
        self._tree_attention = supports_tree_attention(loaded.model)
        config = self._config
        forward = functools.partial(batched_forward.forward, loaded.model, fits_together=SHORT_QUERY_TOKENS)
        self._passes = PassScheduler(forward, config.max_batch_tokens, config.max_batch_sessions, self._metrics,
                                     name="draft-passes")
        self._loaded = loaded
        self._encoder = PromptEncoder(loaded.tokenizer)
        self._encoder.warm_up()

    def close(self) -> None:
        """Stop the draft passes (after the server has stopped)."""
        if self._passes is not None:
            self._passes.close()

    def target_info(self) -> ModelInfo:
        """The verifier's model, checked against ours: FAILED_PRECONDITION for an incompatible pair. Asked once
        per connection to the verifier (``TargetInfoCache``)."""
        return self._targets.get()[0]

    def _ask_target_info(self, timeout_s: float = 10.0) -> ModelInfo:
        try:
            target = codec.model_info_from_pb(self._verifier_stub.GetModelInfo(
                pb.ModelInfoRequest(), timeout=timeout_s, metadata=self._verify_metadata))
        except grpc.RpcError as exc:
            raise Unavailable(f"cannot reach the verify service: {exc.code().name}: {exc.details()}") from exc
        check_compatible(self._model().info, target)
        return target

    @translate_errors
    def GetModelInfo(self, request, context):
        return codec.model_info_to_pb(self._model().info)

    @translate_errors
    def Generate(self, request, context):
        with self._sessions.hold(context.cancel) as lease:
            yield from self._generate(request, None, context, lease)

    @translate_errors
    def Session(self, request_iterator, context):
        with self._sessions.hold(context.cancel) as lease:  # before the opening: a silent stream counts too
            opening = next(lease.messages(request_iterator), None)
            if opening is None or opening.WhichOneof("message") != "start":
                raise FailedPrecondition("a Session stream must start with a GenerateRequest")
            yield from self._generate(opening.start, request_iterator, context, lease)

    def _generate(self, request: pb.GenerateRequest, budget_updates, context, lease: Lease):
        """Run one generation; ``budget_updates`` is the rest of a Session stream (None for Generate)."""
        received_at = time.perf_counter()
        loaded = self._model()
        request_id = lease.name = codec.request_id_from_pb(request.request_id) or lease.key
        target, asked = self._targets.get()
        first_token = FirstTokenTimes(model_info_s=time.perf_counter() - received_at if asked else 0.0)
        budget = self._initial_budget(request, target)
        if budget_updates is not None:
            threading.Thread(target=_follow_budget_updates, args=(budget_updates, budget), daemon=True).start()
        tokenize_started = time.perf_counter()
        prompt = self._prompt(request, target)
        first_token.tokenize_s = time.perf_counter() - tokenize_started
        params = codec.decoding_from_pb(request.decoding)
        stopping = codec.stopping_from_pb(request.stopping)
        if stopping.max_new_tokens > self._config.max_new_tokens_limit:
            raise InvalidArgument(
                f"max_new_tokens {stopping.max_new_tokens} exceeds this service's limit {self._config.max_new_tokens_limit}"
            )
        plan = SessionPlan(request_id, prompt, params, target.max_context_tokens, overlap=not request.sequential,
                           draft_prefill_first=self._config.draft_prefill_first)
        stop = StopChecker(stopping, frozenset(target.eos_token_ids), self._encoder.decode)
        stop_ids = frozenset() if stopping.ignore_eos else frozenset(target.eos_token_ids)
        max_tokens = min(target.max_context_tokens, loaded.info.max_context_tokens)

        trees = self._tree_attention and target.tree_attention  # else chains: one side takes no tree mask

        def make_drafter() -> TreeDrafter:
            return TreeDrafter(loaded.model, params, target.vocab_size, stop_ids, max_tokens, budget.max_branches, trees,
                               self._config.context_copy, self._passes, gone=lambda: not context.is_active())

        link = GrpcVerifierLink(self._verify_channel, self._config.verify_timeout_s, self._verify_metadata,
                                loaded.info.tokenizer_fingerprint)
        session = SpeculativeSession(plan, link, make_drafter, stop, budget)
        session.stats.first_token = first_token
        metrics = self._metrics
        with metrics.sessions_active.track_inprogress():
            metrics.sessions_total.inc()
            log.info("session %s: %d prompt tokens, budget %d", request_id, len(prompt), budget())
            started = pb.DraftBudget(max_draft_tokens=budget(), max_branches=budget.max_branches() if trees else 1)
            yield pb.GenerateEvent(started=pb.Started(request_id=request_id, prompt_tokens=len(prompt), budget=started))
            with contextlib.closing(session.run(received_at)) as events:  # closing frees the verifier's session
                for event in _forgetting_target_on_failure(events, self._targets):
                    if not context.is_active():
                        log.info("session %s: client went away", request_id)
                        return
                    self._observe(request_id, event)  # before yielding: the caller may hang up after the last
                    yield codec.event_to_pb(event)

    def _observe(self, request_id: str, event: GenerationEvent) -> None:
        metrics = self._metrics
        if isinstance(event, CommittedEvent):
            if event.timings is not None:
                metrics.draft_seconds.observe(event.timings.draft_compute_s)
            return
        stats = event.stats
        metrics.ttft_seconds.observe(stats.ttft_s)
        if stats.new_tokens > 1:
            metrics.inter_token_seconds.observe((stats.total_s - stats.ttft_s) / (stats.new_tokens - 1))
        log.info("session %s: %d tokens (%s), %d rounds, %.1f tokens/s", request_id, stats.new_tokens,
                 event.reason.value, stats.rounds, stats.new_tokens / stats.total_s if stats.total_s else 0.0)

    def _prompt(self, request: pb.GenerateRequest, target: ModelInfo) -> tuple[int, ...]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            chat = request.apply_chat_template if request.HasField("apply_chat_template") else None
            prompt = self._encoder.encode_text(request.text, chat)
        elif kind == "token_ids":
            if not request.token_ids.ids:
                raise InvalidArgument("the prompt is empty: give some text or token ids")
            prompt = codec.token_ids_from_pb(request.token_ids.ids, target.vocab_size, "prompt")
        else:
            raise InvalidArgument("the prompt is missing: set text or token_ids")
        if len(prompt) >= target.max_context_tokens:
            raise InvalidArgument(
                f"the prompt has {len(prompt)} tokens; the target's context holds {target.max_context_tokens} "
                "including at least one new token"
            )
        limit = self._config.max_prompt_tokens
        if limit is not None and len(prompt) > limit:
            raise InvalidArgument(f"the prompt has {len(prompt)} tokens; this service accepts at most {limit}")
        return prompt

    def _initial_budget(self, request: pb.GenerateRequest, target: ModelInfo) -> BudgetHolder:
        if request.HasField("budget"):
            return BudgetHolder(request.budget.max_draft_tokens, target.max_tree_nodes, request.budget.max_branches)
        return BudgetHolder(min(self._config.default_budget, target.max_tree_nodes), target.max_tree_nodes,
                            self._config.default_max_branches)

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            raise Unavailable("the draft model is still loading; retry shortly")
        return self._loaded


def _forgetting_target_on_failure(events, targets: TargetInfoCache):
    """The session's events; a failed verifier stream makes the next session ask the verifier's model again
    (a replaced verifier may run another one)."""
    try:
        yield from events
    except (grpc.RpcError, FailedPrecondition):
        targets.forget()
        raise


def _follow_budget_updates(request_iterator, budget: BudgetHolder) -> None:
    """Apply the client's BudgetUpdate messages until it half-closes or the call ends."""
    try:
        for request in request_iterator:
            if request.WhichOneof("message") == "budget":
                try:
                    budget.update(request.budget.budget.max_draft_tokens, request.budget.budget.max_branches)
                except InvalidArgument as exc:
                    log.warning("ignoring budget update: %s", exc)
    except grpc.RpcError:
        pass  # the call ended; the session notices on its own
