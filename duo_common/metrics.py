"""Prometheus metrics of one service, on a registry of its own (several services may share a process in
tests), served over HTTP at ``/metrics``. Spec-decode counters are named after vLLM's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.sessions_active = Gauge("duo_sessions_active", "Sessions running now", **labels)
        self.sessions_total = Counter("duo_sessions", "Sessions started", **labels)
        self.errors = Counter("duo_rpc_errors", "Calls that ended with a non-OK status", ["method", "code"], **labels)
        # verify service
        self.proposal_size = Histogram("duo_proposal_size_nodes", "Nodes per verified proposal",
                                       buckets=_SIZE_BUCKETS, **labels)
        self.verify_seconds = Histogram("duo_verify_compute_seconds", "Target forward pass per proposal",
                                        buckets=_LATENCY_BUCKETS, **labels)
        self.prefill_seconds = Histogram("duo_prefill_compute_seconds", "Target prefill per session",
                                         buckets=_LATENCY_BUCKETS, **labels)
        # both services: forward passes shared by sessions (duo.common.pass_scheduler)
        self.batch_sequences = Histogram("duo_batch_sequences", "Sessions' sequences scored per forward pass",
                                         buckets=_SIZE_BUCKETS, **labels)
        self.batch_tokens = Histogram("duo_batch_tokens", "Tokens scored per forward pass",
                                      buckets=_BATCH_TOKEN_BUCKETS, **labels)
        self.queue_wait_seconds = Histogram("duo_queue_wait_seconds", "Wait of a session's work for its forward pass",
                                            buckets=_LATENCY_BUCKETS, **labels)
        self.waiting_sequences = Gauge("duo_waiting_sequences", "Sessions' work waiting for a forward pass", **labels)
        self.kv_cache_tokens = Gauge("duo_kv_cache_tokens", "Positions held in the KV caches of live sessions",
                                     **labels)
        self.num_drafts = Counter("duo_spec_decode_num_drafts", "Proposals verified", **labels)
        self.num_draft_tokens = Counter("duo_spec_decode_num_draft_tokens", "Draft tokens proposed", **labels)
        self.num_accepted_tokens = Counter("duo_spec_decode_num_accepted_tokens", "Draft tokens accepted", **labels)
        self.accepted_per_pos = Counter("duo_spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each depth of the proposal", ["position"], **labels)
        # draft service
        self.draft_seconds = Histogram("duo_draft_compute_seconds", "Drafter compute per round",
                                       buckets=_LATENCY_BUCKETS, **labels)
        self.ttft_seconds = Histogram("duo_time_to_first_token_seconds", "Generate API: request to first token",
                                      buckets=_LATENCY_BUCKETS, **labels)
        self.inter_token_seconds = Histogram("duo_inter_token_latency_seconds",
                                             "Generate API: seconds per token after the first",
                                             buckets=_LATENCY_BUCKETS, **labels)

    def count_error(self, method: str, code: str) -> None:
        self.errors.labels(method=method, code=code).inc()

    def record_verdict(self, proposal_size: int, accepted: int, compute_s: float) -> None:
        self.proposal_size.observe(proposal_size)
        self.verify_seconds.observe(compute_s)
        if proposal_size:
            self.num_drafts.inc()
            self.num_draft_tokens.inc(proposal_size)
            self.num_accepted_tokens.inc(accepted)
            for position in range(accepted):
                self.accepted_per_pos.labels(position=str(position)).inc()

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the ``/metrics`` HTTP endpoint; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
