"""Continuous batching: one forward pass serves the waiting work of every session.

Each session's thread hands its work to the scheduler as a *job* and waits: a generator that yields the
tokens it needs scored (``NewTokens``), receives each pass's logits (``Scored``) and returns its outcome (a
verification yields once, a long prompt once per chunk). One worker thread runs the passes: each takes the
jobs waiting, oldest first, up to a token and a sequence budget, runs their tokens through the model together
and hands each job its rows. A job that needs another pass waits again behind the others, so a long prompt
holds everyone up for one chunk at a time, and work that arrives while a pass runs joins the next one.

    session A ─ proposal ─┐                      ┌─▶ A's outcome
    session B ─ proposal ─┼─▶ queue ─▶ pass ─────┼─▶ B's outcome
    session C ─ prompt ───┘   (A, B, C's chunk)  └─▶ C waits for its next chunk

A session answered by a pass usually comes back with more work after a short round trip (the verifier's
sessions through their drafter, a drafter's through its own bookkeeping), so before the next pass the worker
waits for those, at most a quarter of the last pass's duration: without that wait each pass would start with
the first to return and the rest would miss it. Each job checks its input in its caller's thread, before it
queues, so bad input fails alone. Both services use it: the verify service for prefills and proposals, the
draft service for its sessions' draft forwards.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Hashable

import torch

from duo.common.batched_forward import NewTokens
from duo.common.errors import Cancelled
from duo.common.metrics import ServiceMetrics

GATHER_SHARE = 0.25  # a pass waits for returning sessions at most this share of the last pass's duration
BACKGROUND_PASS_TOKENS = 16  # largest pass of background work alone


@dataclass(frozen=True)
class Scored:
    """What a job receives after a pass: its rows' logits, the pass's seconds, whom the pass served, and how
    long the job waited for it."""

    logits: torch.Tensor
    pass_s: float
    pass_sequences: int = 1
    pass_tokens: int = 0
    wait_s: float = 0.0  # how long the job's tokens waited for this pass


Job = Generator[NewTokens, Scored, object]


def one_pass(tokens: NewTokens) -> Job:
    """The job of a single forward: returns the logits."""
    scored = yield tokens
    return scored.logits


def sequences_in_pass(waiting_tokens: list[int], max_tokens: int, max_sequences: int) -> int:
    """How many of the waiting jobs (their token counts, oldest first) join the next pass: the oldest ones
    while they fit both budgets, and always the oldest (a job larger than the token budget runs alone)."""
    count = total = 0
    for tokens in waiting_tokens[:max_sequences]:
        if count and total + tokens > max_tokens:
            break
        count, total = count + 1, total + tokens
    return count


@dataclass(eq=False)
class _Waiting:
    owner: Hashable
    job: Job
    tokens: NewTokens
    background: bool = False
    gone: Callable[[], bool] = lambda: False  # the caller has gone (a cancelled stream): drop the job
    since: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    outcome: object = None
    error: BaseException | None = None

    def finish(self, outcome: object = None, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


class PassScheduler:
    """Runs jobs through ``forward`` (NewTokens of several sequences → each one's logits), many per pass."""

    def __init__(self, forward: Callable[[list[NewTokens]], list[torch.Tensor]], max_batch_tokens: int = 256,
                 max_batch_sequences: int = 64, metrics: ServiceMetrics | None = None, name: str = "passes"):
        if max_batch_tokens < 1 or max_batch_sequences < 1:
            raise ValueError("batch budgets must be at least 1")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sequences = max_batch_sequences
        self._forward = forward
        self._metrics = metrics
        self._queue: list[_Waiting] = []
        self._returning: dict[Hashable, None] = {}  # owners the last pass answered, not back yet
        self._last_pass_s = 0.0
        self._changed = threading.Condition()
        self._closed = False
        if metrics is not None:
            metrics.waiting_sequences.set_function(lambda: len(self._queue))
        self._worker = threading.Thread(target=self._run_passes, name=name, daemon=True)
        self._worker.start()

    def run(self, owner: Hashable, job: Job, background: bool = False, gone: Callable[[], bool] | None = None):
        """Advance ``job`` (``owner``'s: a session, a drafter) through passes to its outcome; blocks.
        ``background`` work (a drafter drafting ahead) runs only in passes that no other work is waiting for,
        of at most BACKGROUND_PASS_TOKENS tokens, so it never holds up work on a session's critical path
        for longer than one such pass. A job whose caller is ``gone`` before its next pass is dropped (the
        rest of a cancelled stream's prompt is not prefilled) and raises Cancelled."""
        waiting = _Waiting(owner, job, next(job), background)  # the job checks its input here, in the caller's thread
        if gone is not None:
            waiting.gone = gone
        with self._changed:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._queue.append(waiting)
            self._returning.pop(owner, None)
            self._changed.notify()
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.outcome

    def forward(self, owner: Hashable, tokens: NewTokens, background: bool = False,
                gone: Callable[[], bool] | None = None) -> torch.Tensor:
        """One forward of ``tokens`` in the next pass (``run``): their kept logits."""
        return self.run(owner, one_pass(tokens), background, gone)

    def forget(self, owner: Hashable) -> None:
        """``owner`` has no more work: passes no longer wait for it."""
        with self._changed:
            self._returning.pop(owner, None)
            self._changed.notify()

    def close(self) -> None:
        """Stop after the pass in progress; jobs still waiting fail."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join()

    def _run_passes(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                self._gather()
                if self._closed:
                    for waiting in self._queue:
                        waiting.finish(error=RuntimeError("the service is shutting down"))
                    self._queue.clear()
                    return
                batch = self._next_batch()
            if not batch:
                continue
            again, answered = self._run_pass(batch)
            with self._changed:
                self._queue.extend(again)
                self._returning.update(dict.fromkeys(answered))

    def _next_batch(self) -> list[_Waiting]:
        """Take the next pass's jobs off the queue: the oldest work that fits, or background work when no
        other work waits; jobs whose callers have gone leave the queue. (Called locked.)"""
        for waiting in [w for w in self._queue if w.gone()]:
            self._queue.remove(waiting)
            waiting.job.close()
            waiting.finish(error=Cancelled("the caller went away before its work ran"))
        if not self._queue:
            return []
        foreground = [w for w in self._queue if not w.background]
        candidates, max_tokens = (foreground, self.max_batch_tokens) if foreground else \
            (self._queue, min(self.max_batch_tokens, BACKGROUND_PASS_TOKENS))
        count = sequences_in_pass([len(w.tokens.token_ids) for w in candidates], max_tokens, self.max_batch_sequences)
        batch = candidates[:count]
        taken = set(map(id, batch))
        self._queue = [w for w in self._queue if id(w) not in taken]
        return batch

    def _gather(self) -> None:
        """Wait for the owners the last pass answered, up to GATHER_SHARE of its duration. (Called locked.)"""
        deadline = time.perf_counter() + GATHER_SHARE * self._last_pass_s
        while self._returning and len(self._queue) < self.max_batch_sequences and not self._closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._changed.wait(left)
        self._returning.clear()

    def _run_pass(self, batch: list[_Waiting]) -> tuple[list[_Waiting], list[Hashable]]:
        """Score the batch; returns the jobs that need another pass, and the owners answered."""
        started = time.perf_counter()
        tokens = sum(len(waiting.tokens.token_ids) for waiting in batch)
        self._observe(batch, tokens, started)
        try:
            logits = self._forward([waiting.tokens for waiting in batch])
        except Exception as exc:  # noqa: BLE001 - every job of the pass gets the error; the service goes on
            for waiting in batch:
                waiting.finish(error=exc)
            return [], []
        self._last_pass_s = pass_s = time.perf_counter() - started
        again, answered = [], []
        for waiting, rows in zip(batch, logits):
            try:
                waiting.tokens = waiting.job.send(Scored(rows, pass_s, len(batch), tokens, started - waiting.since))
                waiting.since = time.perf_counter()
                again.append(waiting)
            except StopIteration as finished:
                answered.append(waiting.owner)
                waiting.finish(outcome=finished.value)
            except Exception as exc:  # noqa: BLE001 - this job's error is its caller's
                waiting.finish(error=exc)
        return again, answered

    def _observe(self, batch: list[_Waiting], tokens: int, started: float) -> None:
        if self._metrics is None:
            return
        self._metrics.batch_sequences.observe(len(batch))
        self._metrics.batch_tokens.observe(tokens)
        for waiting in batch:
            self._metrics.queue_wait_seconds.observe(started - waiting.since)
