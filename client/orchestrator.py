"""The client orchestrator: opens a Session on a draft service, steers its draft budget from the
per-round timings, and collects the committed tokens into a result.

The budget policy is a small object: ``initial()`` before the session, ``after_round(timings)`` after
each round, returning a new budget or None to keep the current one.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import grpc

from duo_common import codec
from duo_common.compat import check_compatible
from duo_common.events import CommittedEvent, FinishedEvent, RoundTimings, SessionStats
from duo_common.models import ModelInfo
from duo_common.params import DecodingParams, StoppingParams
from duo_common.stopping import FinishReason
from protos import duo_pb2 as pb
from protos import duo_pb2_grpc

_CLOSE = object()


class BudgetPolicy(Protocol):
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
    apply_chat_template: bool | None = None  # None: the tokenizer's default
    decoding: DecodingParams = DecodingParams()
    stopping: StoppingParams = StoppingParams()
    sequential: bool = False  # benchmarks only: no drafting while the verifier works

    def __post_init__(self) -> None:
        if (self.prompt_text is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt_text and prompt_ids")


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
            "draft_compute_s": round(stats.draft_compute_s, 4),
            "verify_compute_s": round(stats.verify_compute_s, 4),
            "verify_round_trip_s": round(stats.verify_round_trip_s, 4),
            "first_token": self.first_token(),
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
    def __init__(self, channel: grpc.Channel, timeout_s: float | None = None, metadata: tuple = ()):
        self._stub = duo_pb2_grpc.DrafterStub(channel)
        self._timeout_s = timeout_s
        self._metadata = metadata

    def draft_model_info(self) -> ModelInfo:
        return codec.model_info_from_pb(
            self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self._timeout_s or 30, metadata=self._metadata))

    def generate(
        self,
        request: GenerationRequest,
        policy: BudgetPolicy,
        on_text: Callable[[str], None] = lambda text: None,
    ) -> GenerationResult:
        """Run one generation to its end, calling ``on_text`` with each newly final piece of text."""
        outbox: queue.Queue = queue.Queue()
        budget = policy.initial()
        width = getattr(policy, "max_branches", 1)  # a policy without a width drafts chains
        outbox.put(pb.SessionRequest(start=_request_to_pb(request, budget, width)))
        started = time.perf_counter()
        call = self._stub.Session(iter(outbox.get, _CLOSE), timeout=self._timeout_s, metadata=self._metadata)
        token_ids: list[int] = []
        budgets: list[int] = []
        rounds: list[RoundTimings] = []
        ttft_s = 0.0
        try:
            for event in _events(call):
                if isinstance(event, FinishedEvent):
                    return GenerationResult(event.text, token_ids, event.reason, event.stats, ttft_s,
                                            time.perf_counter() - started, budgets, rounds)
                if event.token_ids and not token_ids:
                    ttft_s = time.perf_counter() - started
                token_ids.extend(event.token_ids)
                if event.text_delta:
                    on_text(event.text_delta)
                if event.timings is not None:
                    budgets.append(budget)
                    rounds.append(event.timings)
                    new_budget = policy.after_round(event.timings)
                    if new_budget is not None and new_budget != budget:
                        budget = new_budget
                        outbox.put(pb.SessionRequest(budget=pb.BudgetUpdate(
                            budget=pb.DraftBudget(max_draft_tokens=budget, max_branches=width))))
        finally:
            outbox.put(_CLOSE)
            call.cancel()
        raise RuntimeError("the draft service ended the session without a Finished event")


def check_verifier(orchestrator: Orchestrator, verify_channel: grpc.Channel, metadata: tuple = ()) -> ModelInfo:
    """Remote mode with a known verifier: refuse an incompatible pair before any generation."""
    stub = duo_pb2_grpc.VerifierStub(verify_channel)
    target = codec.model_info_from_pb(stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=metadata))
    check_compatible(orchestrator.draft_model_info(), target)
    return target


def _events(call) -> Iterator[CommittedEvent | FinishedEvent]:
    for message in call:
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
    else:
        message.token_ids.ids.extend(request.prompt_ids)
    if request.apply_chat_template is not None:
        message.apply_chat_template = request.apply_chat_template
    return message
