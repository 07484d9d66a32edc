"""What a generation stream carries, as dataclasses: committed tokens with their round's timings, then
the finish with statistics. The draft service produces them; the client reads them back (codec)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from duo.common.stopping import FinishReason


@dataclass(frozen=True)
class RoundTimings:
    draft_compute_s: float
    verify_compute_s: float
    verify_round_trip_s: float
    proposal_size: int
    accepted_size: int
    draft_tokens: int = 0  # draft forward steps behind draft_compute_s (the proposal and drafting ahead)
    proposal_depth: int = 0  # longest path of the proposed tree (= proposal_size for a chain); 0: unknown
    draft_ahead_s: float = 0.0  # of draft_compute_s, drafted ahead behind verification (0: none or not said)
    verify_batch_sessions: int = 0  # sessions the verifier's pass served (it batches); 0: not said
    verify_batch_tokens: int = 0  # tokens that pass scored, over all its sessions
    verify_queue_s: float = 0.0  # of verify_round_trip_s, the wait at the verifier for the pass (0: not said)


@dataclass(frozen=True)
class CommittedEvent:
    token_ids: tuple[int, ...]
    text_delta: str
    timings: RoundTimings | None  # None for the first token (prefill)


class BudgetSource(str, enum.Enum):
    """Who chose a session's draft budgets."""

    REQUEST = "request"  # the request's budget, unchanged
    CLIENT = "client"  # the client changed it between rounds
    SERVICE = "service"  # the draft service's latency-aware controller (the request set none)


@dataclass
class FirstTokenTimes:
    """Where the first token's time went at the draft service (seconds; ``SessionStats.ttft_s`` is their sum
    plus the service's own work: building the session, sending the token)."""

    tokenize_s: float = 0.0
    model_info_s: float = 0.0  # asking the verifier for its model: a round trip, 0 when known for the connection
    verifier_queue_s: float = 0.0  # the prefill waiting for passes at the verifier (others' work ahead)
    prefill_s: float = 0.0  # the target's prefill compute
    verifier_link_s: float = 0.0  # the rest of the wait for the verifier's first token: round trip, stream setup


@dataclass
class SessionStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_compute_s: float = 0.0
    verify_compute_s: float = 0.0
    verify_round_trip_s: float = 0.0
    final_draft_budget: int = 0
    first_token: FirstTokenTimes = field(default_factory=FirstTokenTimes)
    draft_budget_source: BudgetSource | None = None  # None: not said (an older draft service)
    verifier_resumes: int = 0  # verifier sessions reopened after losing the verifier mid-generation

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per verification round (the first token comes from the prefill)."""
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Of the draft tokens proposed, the share the target accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class FinishedEvent:
    reason: FinishReason
    text: str
    stats: SessionStats = field(compare=False)


GenerationEvent = CommittedEvent | FinishedEvent
