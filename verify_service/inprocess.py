"""The verify service inside the calling process, on a loopback port: the real servicer, scheduler and gRPC
server that ``duo-verify serve`` runs, for tests and benchmarks that want the gRPC path without child
processes (``duo.draft_service.inprocess`` adds a draft service beside it)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, NamedTuple

from duo.common.metrics import ServiceMetrics
from duo.common.models import load_causal_lm
from duo.common.rpc import ServerOptions, ServiceServer
from duo.common.sessions import SessionRegistry
from duo.protos import duo_pb2_grpc
from duo.verify_service.engine import TargetVerifier
from duo.verify_service.scheduler import VerifyScheduler
from duo.verify_service.servicer import VerifierServicer


class RunningService(NamedTuple):
    address: str  # host:port
    sessions: SessionRegistry


@contextlib.contextmanager
def verify_server(target: str | Path, max_sessions: int = 8, max_tree_nodes: int = 64,
                  options: ServerOptions | None = None, metrics: ServiceMetrics | None = None, port: int = 0,
                  dtype: str = "auto", cpu_kernels: str = "auto", max_batch_sessions: int = 64,
                  max_batch_tokens: int = 256) -> Iterator[RunningService]:
    """Serving once the target (a model name or folder, on the CPU) has loaded; stopped on exit. ``options``
    default to ``max_sessions`` sessions."""
    options = options or ServerOptions(max_sessions=max_sessions)
    sessions = SessionRegistry(options.max_sessions, options.idle_timeout_s)
    servicer = VerifierServicer(sessions, metrics)
    server = ServiceServer(["duo.v1.Verifier"], options, metrics)
    duo_pb2_grpc.add_VerifierServicer_to_server(servicer, server.server)
    port = server.bind(f"127.0.0.1:{port}")
    server.start()
    verifier = TargetVerifier(load_causal_lm(str(target), "cpu", dtype, cpu_kernels), max_tree_nodes)
    scheduler = VerifyScheduler(verifier, max_batch_tokens, max_batch_sessions, metrics)
    servicer.attach(scheduler)
    server.mark_serving()
    try:
        yield RunningService(f"127.0.0.1:{port}", sessions)
    finally:
        server.stop(0)
        scheduler.close()
