"""Continuous batching: one forward pass scores the waiting work of every session.

Each session's stream hands its prefill or its proposal to the scheduler as a job (``engine``) and waits.
One worker thread runs the passes: each takes the jobs waiting (oldest first) up to a token and a session
budget, runs their tokens through the target together (``TargetVerifier.forward``) and hands each job its
logits. A job that needs another pass (the next chunk of a long prompt) waits again behind the others, so
a long prompt holds everyone up for one chunk at a time, and work that arrives while a pass runs joins the
next one.

    stream A ─ proposal ─┐                      ┌─▶ verdict A
    stream B ─ proposal ─┼─▶ queue ─▶ pass ─────┼─▶ verdict B
    stream C ─ prompt ───┘   (A, B, C's chunk)  └─▶ C waits for its next chunk

Each job validates its input in its caller's thread, before it queues, so a bad proposal fails alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from duo_common.batched_forward import NewTokens
from duo_common.metrics import ServiceMetrics
from duo_common.tree import TokenTree
from verify_service.engine import Job, Prefill, Scored, TargetSession, TargetVerifier, VerifyOutcome


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
    job: Job
    tokens: NewTokens
    since: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    outcome: object = None
    error: BaseException | None = None

    def finish(self, outcome: object = None, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


class VerifyScheduler:
    def __init__(self, verifier: TargetVerifier, max_batch_tokens: int = 256, max_batch_sessions: int = 64,
                 metrics: ServiceMetrics | None = None):
        if max_batch_tokens < 1 or max_batch_sessions < 1:
            raise ValueError("batch budgets must be at least 1")
        self.verifier = verifier
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sessions = max_batch_sessions
        self._metrics = metrics
        self._queue: list[_Waiting] = []
        self._changed = threading.Condition()
        self._closed = False
        if metrics is not None:
            metrics.waiting_sessions.set_function(lambda: len(self._queue))
            metrics.kv_cache_tokens.set_function(verifier.cached_tokens)
        self._worker = threading.Thread(target=self._run_passes, name="verify-passes", daemon=True)
        self._worker.start()

    def prefill(self, session: TargetSession) -> Prefill:
        return self._run(self.verifier.prefill_job(session))

    def verify(self, session: TargetSession, tree: TokenTree) -> VerifyOutcome:
        return self._run(self.verifier.verify_job(session, tree))

    def close(self) -> None:
        """Stop after the pass in progress; jobs still waiting fail."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join()

    def _run(self, job: Job):
        waiting = _Waiting(job, next(job))  # the job checks its input here, in the caller's thread
        with self._changed:
            if self._closed:
                raise RuntimeError("the verify scheduler is closed")
            self._queue.append(waiting)
            self._changed.notify()
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.outcome

    def _run_passes(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if self._closed:
                    for waiting in self._queue:
                        waiting.finish(error=RuntimeError("the verify service is shutting down"))
                    self._queue.clear()
                    return
                count = sequences_in_pass([len(w.tokens.token_ids) for w in self._queue], self.max_batch_tokens,
                                          self.max_batch_sessions)
                batch, self._queue[:count] = self._queue[:count], []
            again = self._run_pass(batch)
            if again:
                with self._changed:
                    self._queue.extend(again)

    def _run_pass(self, batch: list[_Waiting]) -> list[_Waiting]:
        """Score the batch; returns the jobs that need another pass."""
        started = time.perf_counter()
        self._observe(batch, started)
        try:
            logits = self.verifier.forward([waiting.tokens for waiting in batch])
        except Exception as exc:  # noqa: BLE001 - every job of the pass gets the error; the service goes on
            for waiting in batch:
                waiting.finish(error=exc)
            return []
        scored_s = time.perf_counter() - started
        again = []
        for waiting, rows in zip(batch, logits):
            try:
                waiting.tokens = waiting.job.send(Scored(rows, scored_s))
                waiting.since = time.perf_counter()
                again.append(waiting)
            except StopIteration as finished:
                waiting.finish(outcome=finished.value)
            except Exception as exc:  # noqa: BLE001 - this job's error is its caller's
                waiting.finish(error=exc)
        return again

    def _observe(self, batch: list[_Waiting], started: float) -> None:
        if self._metrics is None:
            return
        self._metrics.batch_sessions.observe(len(batch))
        self._metrics.batch_tokens.observe(sum(len(waiting.tokens.token_ids) for waiting in batch))
        for waiting in batch:
            self._metrics.queue_wait_seconds.observe(started - waiting.since)
