"""The client orchestrator: opens a Session on a draft service, steers its draft budget from the
per-round timings, and collects the committed tokens into a result.

The budget policy is a small object: ``initial()`` before the session, ``after_round(timings)`` after
each round, returning a new budget or None to keep the current one.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import grpc

from duo.common import codec
from duo.common.compat import check_compatible
from duo.common.events import CommittedEvent, FinishedEvent, RoundTimings, SessionStats
from duo.common.generation_spec import ChatMessage
from duo.common.keepalive import connection_lost, wait_connected
from duo.common.models import ModelInfo
from duo.common.params import DecodingParams, StoppingParams
from duo.common.resume import ResumePolicy
from duo.common.stopping import FinishReason
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc

_CLOSE = object()
log = logging.getLogger(__name__)


class BudgetPolicy(Protocol):
    @property
    def max_branches(self) -> int: ...  # children per node of the trees it asks for (1: chains)
    def initial(self) -> int: ...
    def after_round(self, timings: RoundTimings) -> int | None: ...


@dataclass
class FixedBudget:
    """Always the same number of draft tokens per round (0: no speculation), in trees of at most
    ``max_branches`` children per node (1: chains)."""

    tokens: int
    max_branches: int = 1

    def initial(self) -> int:
        return self.tokens

    def after_round(self, timings: RoundTimings) -> int | None:
        return None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None  # a chat, always through the chat template
    apply_chat_template: bool | None = None  # None: the tokenizer's default (text prompts)
    decoding: DecodingParams = DecodingParams()
    stopping: StoppingParams = StoppingParams()
    sequential: bool = False  # benchmarks only: no drafting while the verifier works

    def __post_init__(self) -> None:
        if sum(prompt is not None for prompt in (self.prompt_text, self.prompt_ids, self.messages)) != 1:
            raise ValueError("give exactly one of prompt_text, prompt_ids and messages")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    server_stats: SessionStats
    ttft_s: float  # client-measured: request sent → first token received
    total_s: float  # client-measured: request sent → finished
    budgets: list[int] = field(default_factory=list)  # budget in force at each round
    rounds: list[RoundTimings] = field(default_factory=list)  # per-round timings, in order
    drafter_resumes: int = 0  # times the draft service was lost and the generation continued

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> dict:
        """The stats block of ``duo-client generate --json``."""
        stats = self.server_stats
        rounds = stats.rounds
        return {
            "ttft_s": round(self.ttft_s, 4),
            "total_s": round(self.total_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "new_tokens": len(self.token_ids),
            "prompt_tokens": stats.prompt_tokens,
            "rounds": rounds,
            # tokens committed per verification round (the first token comes from the prefill)
            "mean_accepted_tokens": round((len(self.token_ids) - 1) / rounds, 4) if rounds else 0.0,
            "acceptance_rate": round(stats.accepted_tokens / stats.drafted_tokens, 4) if stats.drafted_tokens else 0.0,
            "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "draft_budget": self.budgets[-1] if self.budgets else stats.final_draft_budget,
            # who chose the budgets: "request", "client" (this client's policy) or "service" (its controller)
            "draft_budget_source": stats.draft_budget_source.value if stats.draft_budget_source else None,
            "draft_compute_s": round(stats.draft_compute_s, 4),
            "verify_compute_s": round(stats.verify_compute_s, 4),
            "verify_round_trip_s": round(stats.verify_round_trip_s, 4),
            "first_token": self.first_token(),
            "resumes": {"draft_service": self.drafter_resumes, "verifier": stats.verifier_resumes},
        }

    def first_token(self) -> dict[str, float]:
        """Where ``ttft_s`` went, in seconds: the draft service's parts, its own work, and the client's link
        (the request's way there and the first token's way back)."""
        times = self.server_stats.first_token
        parts = {name: getattr(times, name) for name in
                 ("tokenize_s", "model_info_s", "verifier_queue_s", "prefill_s", "verifier_link_s")}
        parts["draft_service_s"] = max(0.0, self.server_stats.ttft_s - sum(parts.values()))
        parts["client_link_s"] = max(0.0, self.ttft_s - self.server_stats.ttft_s)
        return {name: round(value, 4) for name, value in parts.items()}


class Orchestrator:
    def __init__(self, channel: grpc.Channel, timeout_s: float | None = None, metadata: tuple = (),
                 resume: ResumePolicy = ResumePolicy()):
        self._channel = channel
        self._stub = duo_pb2_grpc.DrafterStub(channel)
        self._timeout_s = timeout_s
        self._metadata = metadata
        self.resume = resume  # carrying a generation on after losing the draft service

    def draft_model_info(self) -> ModelInfo:
        return codec.model_info_from_pb(
            self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self._timeout_s or 30, metadata=self._metadata))

    def generate(
        self,
        request: GenerationRequest,
        policy: BudgetPolicy,
        on_text: Callable[[str], None] = lambda text: None,
    ) -> GenerationResult:
        """Run one generation to its end, calling ``on_text`` with each newly final piece of text.

        A draft service lost mid-generation (``keepalive.connection_lost``) is asked again, on the same address
        (DNS may give another replica), to continue from the tokens received so far, while ``resume`` lasts: no
        token is delivered twice or skipped, and stop strings and max_new_tokens count across the resume. The
        deadline (``timeout_s``) covers all attempts."""
        progress = _Progress(budget=policy.initial(), started=time.perf_counter())
        attempt, lost_at = 0, None
        while True:
            delivered = len(progress.token_ids)
            try:
                return self._attempt(request, policy, on_text, progress)
            except grpc.RpcError as exc:
                if not connection_lost(exc) or not progress.reached:
                    raise  # a draft service never reached is the caller's error at once, not a loss
                if len(progress.token_ids) > delivered:  # that attempt got somewhere: a new loss, a new budget
                    attempt, lost_at = 0, None
                attempt += 1
                lost_at = lost_at or time.perf_counter()
                left_s = self.resume.within_s - (time.perf_counter() - lost_at)
                if attempt > self.resume.attempts or left_s <= 0:
                    raise
                pause_s = self.resume.pause_s(attempt, left_s)
                log.warning("lost the draft service (%s); continuing after %d tokens in %.1f s (attempt %d of %d)",
                            exc.details(), len(progress.token_ids), pause_s, attempt, self.resume.attempts)
                time.sleep(pause_s)
                # a draft service restarting is waited for: attempts go to a service that listens
                wait_connected(self._channel, self.resume.within_s - (time.perf_counter() - lost_at))
                if attempt == 1:
                    progress.drafter_resumes += 1  # a loss, counted once however many attempts it takes

    def _attempt(self, request: GenerationRequest, policy: BudgetPolicy, on_text: Callable[[str], None],
                 progress: _Progress) -> GenerationResult:
        """One Session call, continuing ``progress`` (the tokens earlier attempts received)."""
        outbox: queue.Queue = queue.Queue()
        width = policy.max_branches
        start = _request_to_pb(request, progress.budget, width)
        if progress.token_ids:
            start.continuation.delivered_token_ids.extend(progress.token_ids)
        outbox.put(pb.SessionRequest(start=start))
        timeout_s = None
        if self._timeout_s is not None:
            timeout_s = max(0.001, self._timeout_s - (time.perf_counter() - progress.started))
        call = self._stub.Session(iter(outbox.get, _CLOSE), timeout=timeout_s, metadata=self._metadata)
        token_ids, budgets, rounds = progress.token_ids, progress.budgets, progress.rounds
        try:
            for event in _events(call, progress):
                if isinstance(event, FinishedEvent):
                    del token_ids[event.stats.new_tokens:]  # a stop string's tokens: not the text's (stopping.py)
                    return GenerationResult(event.text, token_ids, event.reason, event.stats, progress.ttft_s,
                                            time.perf_counter() - progress.started, budgets, rounds,
                                            progress.drafter_resumes)
                if event.token_ids and not token_ids:
                    progress.ttft_s = time.perf_counter() - progress.started
                token_ids.extend(event.token_ids)
                if event.text_delta:
                    on_text(event.text_delta)
                if event.timings is not None:
                    budgets.append(progress.budget)
                    rounds.append(event.timings)
                    new_budget = policy.after_round(event.timings)
                    if new_budget is not None and new_budget != progress.budget:
                        progress.budget = new_budget
                        outbox.put(pb.SessionRequest(budget=pb.BudgetUpdate(
                            budget=pb.DraftBudget(max_draft_tokens=new_budget, max_branches=width))))
        finally:
            outbox.put(_CLOSE)
            call.cancel()
        raise RuntimeError("the draft service ended the session without a Finished event")


@dataclass
class _Progress:
    """What a generation has received so far, over all its attempts."""

    budget: int
    started: float
    ttft_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    rounds: list[RoundTimings] = field(default_factory=list)
    drafter_resumes: int = 0
    reached: bool = False  # a draft service answered (its Started event): losing it later is resumed


def check_verifier(orchestrator: Orchestrator, verify_channel: grpc.Channel, metadata: tuple = ()) -> ModelInfo:
    """Remote mode with a known verifier: refuse an incompatible pair before any generation."""
    stub = duo_pb2_grpc.VerifierStub(verify_channel)
    target = codec.model_info_from_pb(stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=metadata))
    check_compatible(orchestrator.draft_model_info(), target)
    return target


def _events(call, progress: _Progress) -> Iterator[CommittedEvent | FinishedEvent]:
    for message in call:
        progress.reached = True
        event = codec.event_from_pb(message)
        if event is not None:
            yield event


def _request_to_pb(request: GenerationRequest, budget: int, max_branches: int = 1) -> pb.GenerateRequest:
    message = pb.GenerateRequest(
        decoding=codec.decoding_to_pb(request.decoding),
        stopping=codec.stopping_to_pb(request.stopping),
        budget=pb.DraftBudget(max_draft_tokens=budget, max_branches=max_branches),
        sequential=request.sequential,
    )
    if request.prompt_text is not None:
        message.text = request.prompt_text
    elif request.messages is not None:
        message.messages.CopyFrom(codec.chat_to_pb(request.messages))
    else:
        message.token_ids.ids.extend(request.prompt_ids)
    if request.apply_chat_template is not None:
        message.apply_chat_template = request.apply_chat_template
    return message
