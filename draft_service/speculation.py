"""The speculative loop of one session: propose → verify → commit, with drafting overlapped.

    round i:   propose(i) ─send─▶ verifier            ◀─verdict(i)─ commit
    meanwhile:            draft ahead: grow the draft tree below round i's proposal, hedging over the
                          target's possible next tokens (several candidates, each with a continuation),
                          until the verdict arrives or enough is drafted

After a full acceptance whose next token is one of the hedged candidates (or a rejection whose correction
was drafted as an unproposed sibling), round i+1's proposal is already drafted.
The target's prefill yields the first token on its own and it is emitted at once, while the draft model
prefills in parallel. Budget 0 means no speculation: the target alone, one token per round.

A session that loses its verifier (``VerifierLost``) opens a new verifier session on the prompt plus every
token committed so far, through ``reconnect`` (the same address: a restarted verifier, or another replica
behind it), and carries on: that session's first token is the round's. The caller sees a delay, never an
error, while ``ResumePolicy`` lasts. Greedy and seeded output is the same as without the fault (a seeded
session's draws depend on the seed and the position only: ``duo.common.sampling``); unseeded sampled output
keeps the target's distribution.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from duo.draft_service.drafter import Drafter
from duo.draft_service.verifier_link import PrefillReply, VerdictReply, VerifierLost
from duo.common.events import CommittedEvent, FinishedEvent, RoundTimings, SessionStats
from duo.common.params import DecodingParams
from duo.common.resume import ResumePolicy
from duo.common.stopping import FinishReason, StopChecker
from duo.common.tree import TokenTree

log = logging.getLogger(__name__)


class VerifierLink(Protocol):
    def wait_connected(self, timeout_s: float) -> bool: ...
    def open(self, session_id: str, prompt: tuple[int, ...], params: DecodingParams) -> None: ...
    def wait_prefill(self) -> PrefillReply: ...
    def send(self, round_number: int, tree: TokenTree) -> None: ...
    def verdict_ready(self) -> bool: ...
    def wait_verdict(self) -> VerdictReply: ...
    def close(self, cancel: bool = True) -> None: ...


@dataclass(frozen=True)
class SessionPlan:
    """Everything a session needs, validated: prompt, parameters and limits."""

    session_id: str
    prompt: tuple[int, ...]
    params: DecodingParams
    max_sequence_tokens: int  # the target's context
    overlap: bool = True  # draft the next round while the verifier works (False: the sequential schedule)
    draft_prefill_first: bool = True  # the draft prefills beside the target's prefill (False: after the first token)


class _DraftPrefill:
    """The draft model reading the prompt in a thread of its own; ``join`` raises what it raised (e.g.
    Cancelled: the caller went away while its forward waited for a pass)."""

    def __init__(self, drafter: Drafter, prompt: tuple[int, ...]):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(drafter, list(prompt)), daemon=True)
        self._thread.start()

    def _run(self, drafter: Drafter, prompt: list[int]) -> None:
        try:
            drafter.prefill(prompt)
        except BaseException as exc:  # noqa: BLE001 - handed to the session's thread at join
            self._error = exc

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class SpeculativeSession:
    def __init__(
        self,
        plan: SessionPlan,
        link: VerifierLink,
        make_drafter: Callable[[], Drafter],
        stop: StopChecker,
        budget: Callable[[], int],
        reconnect: Callable[[], VerifierLink] | None = None,
        resume: ResumePolicy = ResumePolicy(),
    ):
        """``reconnect`` makes a new link to the verifier for a session that lost its own (None: no resume)."""
        self._plan = plan
        self._link = link
        self._make_drafter = make_drafter
        self._stop = stop
        self._budget = budget
        self._reconnect = reconnect
        self._resume = resume
        self.stats = SessionStats(prompt_tokens=len(plan.prompt))

    def run(self, received_at: float | None = None) -> Iterator[CommittedEvent | FinishedEvent]:
        """The session's events; its times count from ``received_at`` (the request's arrival; default: now)."""
        started = time.perf_counter() if received_at is None else received_at
        try:
            yield from self._run(started)
        finally:
            self._link.close(cancel=self._stop.finish_reason is None)  # a finished session only half-closes

    def _run(self, started: float) -> Iterator[CommittedEvent | FinishedEvent]:
        plan, stats = self._plan, self.stats
        self._link.open(plan.session_id, plan.prompt, plan.params)
        drafter, draft_prefill = self._start_drafter() if plan.draft_prefill_first else (None, None)
        try:
            prefill = self._link.wait_prefill()
        except VerifierLost as lost:
            prefill = self._reopen(plan.prompt, lost)
        stats.verify_compute_s += prefill.compute_s
        first = stats.first_token
        first.verifier_queue_s, first.prefill_s = prefill.queue_s, prefill.compute_s
        first.verifier_link_s = max(0.0, prefill.waited_s - prefill.queue_s - prefill.compute_s)
        committed = [*plan.prompt]
        event = self._commit(committed, [prefill.first_token], None)
        stats.ttft_s = time.perf_counter() - started
        yield event
        if not plan.draft_prefill_first:
            drafter, draft_prefill = self._start_drafter()
        if draft_prefill is not None:
            draft_prefill.join()
        round_number = 0
        while self._stop.finish_reason is None:
            if len(committed) >= plan.max_sequence_tokens:
                yield CommittedEvent((), self._stop.end(FinishReason.LENGTH), None)
                break
            round_number += 1
            budget = self._budget()
            if drafter is None and budget > 0:
                drafter = self._make_drafter()  # speculation switched on mid-session
            stats.final_draft_budget = budget
            room = min(budget, self._stop.remaining - 1, plan.max_sequence_tokens - len(committed))
            draft_before = (drafter.compute_s, drafter.tokens_drafted) if drafter else (0.0, 0)
            tree = self._propose(drafter, committed, room)
            self._link.send(round_number, tree)
            ahead_from = drafter.compute_s if drafter else 0.0
            if drafter is not None and plan.overlap and budget > 0:  # budget 0: not speculating now
                self._draft_ahead(drafter, len(tree) + 1 + budget)
            try:
                verdict = self._link.wait_verdict()
            except VerifierLost as lost:
                yield self._resumed_round(committed, tree, drafter, draft_before, lost)
                round_number = 0  # the new verifier session counts its rounds from 1
                continue
            timings = RoundTimings(
                draft_compute_s=(drafter.compute_s - draft_before[0]) if drafter else 0.0,
                verify_compute_s=verdict.compute_s,
                verify_round_trip_s=verdict.round_trip_s,
                proposal_size=len(tree),
                accepted_size=len(verdict.accepted_nodes),
                draft_tokens=(drafter.tokens_drafted - draft_before[1]) if drafter else 0,
                proposal_depth=max(tree.depths(), default=0),
                draft_ahead_s=(drafter.compute_s - ahead_from) if drafter else 0.0,
                verify_batch_sessions=verdict.batch_sessions,
                verify_batch_tokens=verdict.batch_tokens,
                verify_queue_s=verdict.queue_s,
            )
            self._account(timings)
            new_tokens = [tree.token_ids[node] for node in verdict.accepted_nodes] + [verdict.next_token]
            yield self._commit(committed, new_tokens, timings)
        stats.total_s = time.perf_counter() - started
        stats.new_tokens = len(self._stop.token_ids)
        self._link.close(cancel=False)  # the verifier frees the session now, and ends the stream with OK
        yield FinishedEvent(self._stop.finish_reason, self._stop.text, stats)

    def _reopen(self, tokens: tuple[int, ...], lost: VerifierLost) -> PrefillReply:
        """After losing the verifier: new verifier sessions on ``tokens`` through ``reconnect`` while the
        resume policy lasts (then the loss is the caller's error); the first to answer gives its first token."""
        policy, lost_at = self._resume, time.perf_counter()
        for attempt in range(1, policy.attempts + 1):
            left_s = policy.within_s - (time.perf_counter() - lost_at)
            if self._reconnect is None or left_s <= 0:
                break
            pause_s = policy.pause_s(attempt, left_s)
            log.warning("session %s: %s; a new verifier session on %d tokens in %.1f s (attempt %d of %d)",
                        self._plan.session_id, lost, len(tokens), pause_s, attempt, policy.attempts)
            self._link.close()
            time.sleep(pause_s)
            self._link = self._reconnect()
            # a verifier restarting is waited for: attempts go to a verifier that listens
            self._link.wait_connected(policy.within_s - (time.perf_counter() - lost_at))
            try:
                self._link.open(self._plan.session_id, tokens, self._plan.params)
                prefill = self._link.wait_prefill()
            except VerifierLost as again:
                lost = again
                continue
            self.stats.verifier_resumes += 1
            return prefill
        raise lost

    def _resumed_round(self, committed: list[int], tree: TokenTree, drafter: Drafter | None,
                       draft_before: tuple[float, int], lost: VerifierLost) -> CommittedEvent:
        """The round whose verdict was lost: a new verifier session on everything committed gives the
        target's next token (as a verdict accepting none of the proposal would)."""
        sent_at = time.perf_counter()
        prefill = self._reopen(tuple(committed), lost)
        timings = RoundTimings(
            draft_compute_s=(drafter.compute_s - draft_before[0]) if drafter else 0.0,
            verify_compute_s=prefill.compute_s,
            verify_round_trip_s=time.perf_counter() - sent_at,
            proposal_size=len(tree),
            accepted_size=0,
            draft_tokens=(drafter.tokens_drafted - draft_before[1]) if drafter else 0,
            proposal_depth=max(tree.depths(), default=0),
            verify_queue_s=prefill.queue_s,
        )
        self._account(timings)
        return self._commit(committed, [prefill.first_token], timings)

    def _start_drafter(self) -> tuple[Drafter | None, _DraftPrefill | None]:
        if self._budget() == 0:
            return None, None
        drafter = self._make_drafter()
        return drafter, _DraftPrefill(drafter, self._plan.prompt)

    def _propose(self, drafter: Drafter | None, committed: list[int], room: int) -> TokenTree:
        if drafter is None or room <= 0:
            return TokenTree.empty()
        drafter.commit(committed)
        return drafter.propose(room)

    def _draft_ahead(self, drafter: Drafter, target_ahead: int) -> None:
        """Keep drafting while the verifier works, until its verdict arrives or enough is drafted."""
        while not self._link.verdict_ready() and drafter.grow_ahead(target_ahead):
            pass

    def _commit(self, committed: list[int], new_tokens: list[int], timings: RoundTimings | None) -> CommittedEvent:
        result = self._stop.add(new_tokens)
        committed.extend(result.token_ids)
        return CommittedEvent(result.token_ids, result.text_delta, timings)

    def _account(self, timings: RoundTimings) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.drafted_tokens += timings.proposal_size
        stats.accepted_tokens += timings.accepted_size
        stats.draft_compute_s += timings.draft_compute_s
        stats.verify_compute_s += timings.verify_compute_s
        stats.verify_round_trip_s += timings.verify_round_trip_s
