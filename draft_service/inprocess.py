"""The draft service inside the calling process, on a loopback port, and the pair of both services so: the
real servicers and gRPC servers the CLIs run, for tests and benchmarks that want the gRPC path without
child processes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from duo.common.metrics import ServiceMetrics
from duo.common.models import load_causal_lm
from duo.common.rpc import ServerOptions, ServiceServer
from duo.common.security import ChannelSecurity
from duo.common.sessions import SessionRegistry
from duo.draft_service.http_api import build_app
from duo.draft_service.http_server import HttpServer
from duo.draft_service.readiness import ServingState
from duo.draft_service.servicer import DrafterServicer
from duo.draft_service.session_factory import DrafterConfig
from duo.protos import duo_pb2_grpc
from duo.verify_service.inprocess import verify_server


@dataclass(frozen=True)
class DraftServices:
    address: str  # the gRPC server's host:port
    sessions: SessionRegistry
    http_url: str | None  # the HTTP API's base URL (http://127.0.0.1:PORT/v1, https with TLS), when asked for


@dataclass(frozen=True)
class RunningPair:
    verify_addr: str
    draft_addr: str
    verify_sessions: SessionRegistry
    draft_sessions: SessionRegistry
    http_url: str | None = None  # the draft service's HTTP API (running_pair(..., http=True))


@contextlib.contextmanager
def draft_services(draft: str | Path, verify_addr: str, config: DrafterConfig = DrafterConfig(), max_sessions: int = 8,
                   options: ServerOptions | None = None, verify_security: ChannelSecurity = ChannelSecurity(),
                   metrics: ServiceMetrics | None = None, dtype: str = "auto", cpu_kernels: str = "auto",
                   http: bool = False, port: int = 0) -> Iterator[DraftServices]:
    """The draft service's gRPC server, and its HTTP API with ``http`` (with the token of ``options``), serving
    once the draft (a model name or folder, on the CPU) has loaded; stopped on exit."""
    options = options or ServerOptions(max_sessions=max_sessions)
    sessions = SessionRegistry(options.max_sessions, options.idle_timeout_s)
    channel = verify_security.channel(verify_addr, [("grpc.max_receive_message_length", options.max_message_bytes),
                                                    ("grpc.max_send_message_length", options.max_message_bytes)])
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
    servicer.attach(load_causal_lm(str(draft), "cpu", dtype, cpu_kernels))
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
def running_pair(target: str | Path, draft: str | Path, dtype: str = "auto", cpu_kernels: str = "auto",
                 **draft_options) -> Iterator[RunningPair]:
    """Both services, the draft service's verifier the one beside it; ``draft_options`` go to
    ``draft_services``."""
    with verify_server(target, dtype=dtype, cpu_kernels=cpu_kernels) as verify, \
            draft_services(draft, verify.address, dtype=dtype, cpu_kernels=cpu_kernels, **draft_options) as drafting:
        yield RunningPair(verify.address, drafting.address, verify.sessions, drafting.sessions, drafting.http_url)
