"""The draft service's generation sessions, whatever the transport: a decoded request (``GenerationSpec``)
becomes a running ``SpeculativeSession`` whose events (``duo.common.events``) the caller relays — the gRPC
servicer as protobuf, the HTTP API as OpenAI JSON.

Building a session checks the request against this service's limits and the verifier's model (asked once per
connection: ``TargetInfoCache``), chooses its draft budget (``SessionBudget``) and wires a drafter to a
verifier link; any refusal is raised then, before the first event. Running it counts it in the metrics, feeds
the service's budget controller with each round's timings, stops as soon as the caller is gone, and frees the
verifier's session however it ends. Callers hold the session's lease in the ``SessionRegistry`` themselves
(a Session stream is counted before its opening message arrives).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import grpc

from duo.draft_service.prompts import PromptEncoder
from duo.draft_service.session_budget import SessionBudget
from duo.draft_service.speculation import SessionPlan, SpeculativeSession
from duo.draft_service.target_info import TargetInfoCache
from duo.draft_service.tree_drafter import TreeDrafter
from duo.draft_service.verifier_link import GrpcVerifierLink
from duo.common import batched_forward, codec
from duo.common.budget import AdaptiveBudget, ControllerConfig, SharedEstimates
from duo.common.compat import check_compatible
from duo.common.decoder_ops import SHORT_QUERY_TOKENS
from duo.common.errors import FailedPrecondition, InvalidArgument, Unavailable, UpstreamError
from duo.common.events import CommittedEvent, FinishedEvent, FirstTokenTimes, GenerationEvent, SessionStats
from duo.common.generation_spec import GenerationSpec, Prompt
from duo.common.limits import check_prompt_fits, checked_token_ids
from duo.common.metrics import ServiceMetrics
from duo.common.models import LoadedModel, ModelInfo
from duo.common.pass_scheduler import PassScheduler
from duo.common.resume import ResumePolicy
from duo.common.sessions import Lease
from duo.common.stopping import FinishReason, StopChecker
from duo.common.tree import DEFAULT_MAX_BRANCHES
from duo.common.tree_attention import supports_tree_attention
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrafterConfig:
    default_budget: int | None = None  # draft tokens when a request sets none; None: the latency-aware controller
    default_max_branches: int = DEFAULT_MAX_BRANCHES  # tree width when a request sets no budget (1: chains)
    context_copy: bool = True  # mix copies from the context into the draft's distributions (context_copy.py)
    verify_timeout_s: float = 120.0
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int | None = None  # None: whatever the target's context holds
    max_batch_tokens: int = 256  # draft forwards of all sessions share passes (duo.common.pass_scheduler)
    max_batch_sessions: int = 64
    draft_prefill_first: bool = True  # prefill the draft beside the target (False: after the first token)
    resume: ResumePolicy = ResumePolicy()  # carrying a session on after losing its verifier


@dataclass(frozen=True)
class SessionStart:
    """What the caller learns before the first token."""

    request_id: str
    prompt_tokens: int
    draft_budget: int  # draft tokens of the first round
    max_branches: int  # tree width (1: chains, also where either model takes no tree attention mask)


@dataclass(frozen=True)
class Generation:
    """One built session: how it starts, its budget (a Session stream's client may steer it), and its events,
    which run the session as they are read (close the iterator to end it early)."""

    start: SessionStart
    budget: SessionBudget
    events: Iterator[GenerationEvent]


class SessionFactory:
    def __init__(self, config: DrafterConfig, verify_channel: grpc.Channel, metrics: ServiceMetrics | None = None,
                 verify_metadata: tuple = ()):
        self.config = config
        self._verify_channel = verify_channel
        self._verify_metadata = verify_metadata  # e.g. the bearer token the verifier expects
        self._metrics = metrics or ServiceMetrics()
        self._verifier_stub = duo_pb2_grpc.VerifierStub(verify_channel)
        self._loaded: LoadedModel | None = None
        self._encoder: PromptEncoder | None = None
        self._tree_attention = False  # whether the draft model takes a tree attention mask
        self._passes: PassScheduler | None = None
        self._targets = TargetInfoCache(verify_channel, self._ask_target_info)
        self._estimates = SharedEstimates()  # what sessions steered by this service learnt of the verifier

    def attach(self, loaded: LoadedModel) -> None:
        self._tree_attention = supports_tree_attention(loaded.model)
        config = self.config
        forward = functools.partial(batched_forward.forward, loaded.model, fits_together=SHORT_QUERY_TOKENS)
        self._passes = PassScheduler(forward, config.max_batch_tokens, config.max_batch_sessions, self._metrics,
                                     name="draft-passes")
        self._loaded = loaded
        self._encoder = PromptEncoder(loaded.tokenizer)
        self._encoder.warm_up()

    def close(self) -> None:
        """Stop the draft passes (after the servers have stopped)."""
        if self._passes is not None:
            self._passes.close()

    def model(self) -> LoadedModel:
        """The draft model; UNAVAILABLE while it loads."""
        if self._loaded is None:
            raise Unavailable("the draft model is still loading; retry shortly")
        return self._loaded

    def target_info(self) -> ModelInfo:
        """The verifier's model, checked against ours: FAILED_PRECONDITION for an incompatible pair. Asked once
        per connection to the verifier (``TargetInfoCache``)."""
        return self._targets.get()[0]

    def start(self, spec: GenerationSpec, lease: Lease, gone: Callable[[], bool],
              received_at: float | None = None) -> Generation:
        """Build one session (refusals are raised here); ``gone()`` says the caller has left, which ends it.
        Its times count from ``received_at``, the request's arrival (default: now)."""
        received_at = time.perf_counter() if received_at is None else received_at
        loaded = self.model()
        request_id = lease.name = spec.request_id or lease.key
        asking_started = time.perf_counter()
        target, asked = self._verifier_model(gone)
        first_token = FirstTokenTimes(model_info_s=time.perf_counter() - asking_started if asked else 0.0)
        tokenize_started = time.perf_counter()
        prompt = self._prompt(spec.prompt, target)
        first_token.tokenize_s = time.perf_counter() - tokenize_started
        params, stopping = spec.decoding, spec.stopping
        budget = self._session_budget(spec, target)
        if stopping.max_new_tokens > self.config.max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens {stopping.max_new_tokens} exceeds this service's limit "
                                  f"{self.config.max_new_tokens_limit}")
        stop = StopChecker(stopping, frozenset(target.eos_token_ids), self._encoder.decode)
        delivered = self._continued(spec.continue_after, stop, prompt, target)
        plan = SessionPlan(request_id, prompt + delivered, params, target.max_context_tokens,
                           overlap=not spec.sequential, draft_prefill_first=self.config.draft_prefill_first)
        stop_ids = frozenset() if stopping.ignore_eos else frozenset(target.eos_token_ids)
        max_tokens = min(target.max_context_tokens, loaded.info.max_context_tokens)
        trees = self._tree_attention and target.tree_attention  # else chains: one side takes no tree mask

        def make_drafter() -> TreeDrafter:
            return TreeDrafter(loaded.model, params, target.vocab_size, stop_ids, max_tokens, budget.max_branches, trees,
                               self.config.context_copy, self._passes, gone=gone)

        def make_link() -> GrpcVerifierLink:
            return GrpcVerifierLink(self._verify_channel, self.config.verify_timeout_s, self._verify_metadata,
                                    loaded.info.tokenizer_fingerprint)

        session = SpeculativeSession(plan, make_link(), make_drafter, stop, budget, reconnect=make_link,
                                     resume=self.config.resume)
        session.stats.first_token = first_token
        start = SessionStart(request_id, len(prompt), budget(), budget.max_branches() if trees else 1)
        if stop.finish_reason is not None:  # the delivered tokens end it: only the lost call's Finished is left
            stats = SessionStats(prompt_tokens=len(prompt), new_tokens=len(stop.token_ids),
                                 draft_budget_source=budget.source)
            finished = FinishedEvent(stop.finish_reason, stop.text, stats)
            return Generation(start, budget, (event for event in [finished]))  # a generator: callers close it
        log.info("session %s: %d prompt tokens, budget %d", request_id, len(prompt), start.draft_budget)
        return Generation(start, budget, self._run(session, budget, request_id, received_at, gone))

    def _run(self, session: SpeculativeSession, budget: SessionBudget, request_id: str, received_at: float,
             gone: Callable[[], bool]) -> Iterator[GenerationEvent]:
        metrics = self._metrics
        with metrics.sessions_active.track_inprogress():
            metrics.sessions_total.inc()
            with contextlib.closing(session.run(received_at)) as events:  # closing frees the verifier's session
                for event in self._forgetting_verifier_on_failure(events):
                    if gone():
                        log.info("session %s: client went away", request_id)
                        return
                    if isinstance(event, CommittedEvent) and event.timings is not None:
                        budget.after_round(event.timings)
                    elif isinstance(event, FinishedEvent):
                        event.stats.draft_budget_source = budget.source
                    self._observe(request_id, event)  # before yielding: the caller may hang up after the last
                    yield event

    def _verifier_model(self, gone: Callable[[], bool]) -> tuple[ModelInfo, bool]:
        """The verifier's model (``TargetInfoCache.get``). A verifier that cannot answer now (restarting, its
        model still loading) is asked again while the resume policy lasts, so a session that arrives during a
        verifier's restart waits for it, as the sessions it interrupted do."""
        policy, first_refusal = self.config.resume, time.perf_counter()
        for attempt in range(1, policy.attempts + 1):
            try:
                return self._targets.get()
            except Unavailable as exc:
                left_s = policy.within_s - (time.perf_counter() - first_refusal)
                if left_s <= 0 or gone():
                    raise
                log.info("the verify service cannot answer (%s); asking again (attempt %d of %d)", exc, attempt,
                         policy.attempts)
                time.sleep(policy.pause_s(attempt, left_s))
        return self._targets.get()

    def _forgetting_verifier_on_failure(self, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        """The session's events; a failed verifier stream makes the next session ask the verifier's model again
        and start its budget cold (a replaced verifier may run another model, on other hardware). The verifier's
        own status is passed on as this service's error."""
        try:
            yield from events
        except grpc.RpcError as exc:
            self._forget_verifier()
            code = exc.code().name
            raise UpstreamError(code, f"verify service: {code}: {exc.details()}") from exc
        except (FailedPrecondition, Unavailable):
            self._forget_verifier()
            raise

    def _forget_verifier(self) -> None:
        self._targets.forget()
        self._estimates.forget()

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

    def _prompt(self, prompt: Prompt, target: ModelInfo) -> tuple[int, ...]:
        limit = self.config.max_prompt_tokens
        ids = self._encoder.encode(prompt, target.vocab_size,
                                   min(target.max_context_tokens - 1, limit or target.max_context_tokens))
        check_prompt_fits(len(ids), target.max_context_tokens)
        if limit is not None and len(ids) > limit:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; this service accepts at most {limit}")
        return ids

    def _continued(self, delivered: tuple[int, ...], stop: StopChecker, prompt: tuple[int, ...],
                   target: ModelInfo) -> tuple[int, ...]:
        """The tokens an earlier call delivered, checked and fed to ``stop`` first, so stop strings, the token
        limit and the text streamed go on exactly where that call left them."""
        if not delivered:
            return ()
        delivered = checked_token_ids(delivered, target.vocab_size, "continuation")
        if len(prompt) + len(delivered) > target.max_context_tokens:
            raise InvalidArgument(f"the prompt and the {len(delivered)} delivered tokens exceed the target's "
                                  f"context ({target.max_context_tokens}): they are not this request's")
        stop.add(list(delivered))  # when they end it (the lost call's Finished was all that was left): see start
        if stop.finish_reason is None and len(prompt) + len(delivered) == target.max_context_tokens:
            stop.end(FinishReason.LENGTH)  # the context is full: where the lost call ended too
        return delivered

    def _session_budget(self, spec: GenerationSpec, target: ModelInfo) -> SessionBudget:
        """The request's budget; else this service's default: its latency-aware controller, starting from what
        earlier sessions measured, or the configured fixed budget."""
        limit = target.max_tree_nodes
        if spec.budget is not None:
            return SessionBudget(spec.budget.max_draft_tokens, limit, spec.budget.max_branches)
        config = ControllerConfig(max_branches=self.config.default_max_branches)
        config = replace(config, initial_budget=min(config.initial_budget, limit),
                         max_budget=min(config.max_budget, limit))
        fixed = self.config.default_budget
        if fixed is not None:
            return SessionBudget(min(fixed, limit), limit, config.max_branches)
        return SessionBudget(0, limit, config.max_branches, AdaptiveBudget(config, self._estimates))

    def _ask_target_info(self, timeout_s: float = 10.0) -> ModelInfo:
        ours = self.model().info  # while it loads, nothing to compare with: refused before any round trip
        try:
            # wait_for_ready: a verifier that is restarting, or a channel between reconnection attempts, gets
            # the timeout to come back instead of failing the session at once
            target = codec.model_info_from_pb(self._verifier_stub.GetModelInfo(
                pb.ModelInfoRequest(), timeout=timeout_s, metadata=self._verify_metadata, wait_for_ready=True))
        except grpc.RpcError as exc:
            raise Unavailable(f"cannot reach the verify service: {exc.code().name}: {exc.details()}") from exc
        check_compatible(ours, target)
        return target
