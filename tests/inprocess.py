"""Both services in this process on loopback ephemeral ports: the real servicers, the real gRPC path."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from duo.draft_service.http_api import build_app
from duo.draft_service.http_server import HttpServer
from duo.draft_service.readiness import ServingState
from duo.draft_service.servicer import DrafterServicer
from duo.draft_service.session_factory import DrafterConfig
from duo.common.models import load_causal_lm
from duo.common.packed_linear import kernel_unavailable_reason
from duo.common.metrics import ServiceMetrics
from duo.common.rpc import ServerOptions, ServiceServer
from duo.common.security import ChannelSecurity
from duo.common.sessions import SessionRegistry
from duo.protos import duo_pb2_grpc
from duo.verify_service.engine import TargetVerifier
from duo.verify_service.scheduler import VerifyScheduler
from duo.verify_service.servicer import VerifierServicer


# The CPU runtime the in-process services use unless a test says otherwise: duo's packed kernels where they
# can run (what `--cpu-kernels auto` picks for the services' one thread), else torch's.
DEFAULT_KERNELS = "packed" if kernel_unavailable_reason() is None else "torch"


class RunningPair:
    def __init__(self, verify_addr: str, draft_addr: str, verify_sessions: SessionRegistry,
                 draft_sessions: SessionRegistry, http_url: str | None = None):
        self.verify_addr = verify_addr
        self.draft_addr = draft_addr
        self.verify_sessions = verify_sessions
        self.draft_sessions = draft_sessions
        self.http_url = http_url  # the draft service's HTTP API (running_pair(..., http=True))


@contextlib.contextmanager
def verify_server(target_dir, max_sessions: int = 8, max_tree_nodes: int = 64, options: ServerOptions | None = None,
                  metrics: ServiceMetrics | None = None, port: int = 0,
                  cpu_kernels: str = DEFAULT_KERNELS, max_batch_sessions: int = 64, max_batch_tokens: int = 256,
                  ) -> Iterator[tuple[str, SessionRegistry]]:
    options = options or ServerOptions(max_sessions=max_sessions)
    sessions = SessionRegistry(options.max_sessions, options.idle_timeout_s)
    servicer = VerifierServicer(sessions, metrics)
    server = ServiceServer(["duo.v1.Verifier"], options, metrics)
    duo_pb2_grpc.add_VerifierServicer_to_server(servicer, server.server)
    port = server.bind(f"127.0.0.1:{port}")
    server.start()
    verifier = TargetVerifier(load_causal_lm(str(target_dir), "cpu", "float32", cpu_kernels), max_tree_nodes)
    scheduler = VerifyScheduler(verifier, max_batch_tokens, max_batch_sessions, metrics)
    servicer.attach(scheduler)
    server.mark_serving()
    try:
        yield f"127.0.0.1:{port}", sessions
    finally:
        server.stop(0)
        scheduler.close()


@dataclass(frozen=True)
class DraftServices:
    addr: str
    sessions: SessionRegistry
    http_url: str | None  # the HTTP API's base URL (http://127.0.0.1:PORT/v1, https with TLS), when asked for


@contextlib.contextmanager
def draft_services(draft_dir, verify_addr: str, config: DrafterConfig = DrafterConfig(), max_sessions: int = 8,
                   options: ServerOptions | None = None, verify_security: ChannelSecurity = ChannelSecurity(),
                   metrics: ServiceMetrics | None = None, cpu_kernels: str = DEFAULT_KERNELS,
                   http: bool = False, port: int = 0) -> Iterator[DraftServices]:
    """The draft service's gRPC server, and its HTTP API with ``http`` (with the token of ``options``)."""
    options = options or ServerOptions(max_sessions=max_sessions)
    sessions = SessionRegistry(options.max_sessions, options.idle_timeout_s)
    channel = verify_security.channel(verify_addr)
    servicer = DrafterServicer(config, channel, sessions, metrics, verify_security.metadata)
    server = ServiceServer(["duo.v1.Drafter"], options, metrics)
    duo_pb2_grpc.add_DrafterServicer_to_server(servicer, server.server)
    port = server.bind(f"127.0.0.1:{port}")
    server.start()
    serving = ServingState(server.set_serving)
    http_server = None
    if http:
        app = build_app(servicer.factory, sessions, serving, options.auth_token)
        http_server = HttpServer(app, "127.0.0.1", 0, grace_s=1.0, tls=options.tls)
        http_server.start()
    servicer.attach(load_causal_lm(str(draft_dir), "cpu", "float32", cpu_kernels))
    serving.set(True)
    try:
        yield DraftServices(f"127.0.0.1:{port}", sessions,
                            f"{http_server.scheme}://127.0.0.1:{http_server.port}/v1" if http_server else None)
    finally:
        server.stop(0)
        if http_server is not None:
            http_server.stop()
        servicer.close()
        channel.close()


@contextlib.contextmanager
def draft_server(draft_dir, verify_addr: str, *args, **kwargs) -> Iterator[tuple[str, SessionRegistry]]:
    """The draft service's gRPC server (``draft_services``' options): its address and session registry."""
    with draft_services(draft_dir, verify_addr, *args, **kwargs) as services:
        yield services.addr, services.sessions


@contextlib.contextmanager
def running_pair(target_dir, draft_dir, cpu_kernels: str = DEFAULT_KERNELS, **draft_kwargs) -> Iterator[RunningPair]:
    with verify_server(target_dir, cpu_kernels=cpu_kernels) as (verify_addr, verify_sessions), \
            draft_services(draft_dir, verify_addr, cpu_kernels=cpu_kernels, **draft_kwargs) as draft:
        yield RunningPair(verify_addr, draft.addr, verify_sessions, draft.sessions, draft.http_url)
