"""The verify service's continuous batching: every session's prefill chunks and proposals, many per forward
pass of the target (``duo.common.pass_scheduler``), as the engine's jobs (``TargetVerifier.prefill_job``,
``verify_job``)."""

from __future__ import annotations

from typing import Callable

from duo.common.metrics import ServiceMetrics
from duo.common.pass_scheduler import PassScheduler
from duo.common.tree import TokenTree
from duo.verify_service.engine import Prefill, TargetSession, TargetVerifier, VerifyOutcome


class VerifyScheduler(PassScheduler):
    def __init__(self, verifier: TargetVerifier, max_batch_tokens: int = 256, max_batch_sessions: int = 64,
                 metrics: ServiceMetrics | None = None):
        super().__init__(verifier.forward, max_batch_tokens, max_batch_sessions, metrics, name="verify-passes")
        self.verifier = verifier
        if metrics is not None:
            metrics.kv_cache_tokens.set_function(verifier.cached_tokens)

    def prefill(self, session: TargetSession, gone: Callable[[], bool] | None = None) -> Prefill:
        return self.run(session, self.verifier.prefill_job(session), gone=gone)

    def verify(self, session: TargetSession, tree: TokenTree, gone: Callable[[], bool] | None = None) -> VerifyOutcome:
        return self.run(session, self.verifier.verify_job(session, tree), gone=gone)
