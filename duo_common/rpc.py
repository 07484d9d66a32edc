"""The gRPC side of both services: error mapping, the server with health and reflection, shutdown."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duo.common import keepalive
from duo.common.errors import DuoError, StartupError
from duo.common.interceptors import BearerTokenInterceptor, ErrorCountingInterceptor
from duo.common.metrics import ServiceMetrics
from duo.common.security import ServerTls

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# gRPC servers set SO_REUSEPORT by default: a second service started on a taken port would share it, and
# calls would reach either. Off, a taken port is refused.
NO_PORT_SHARING = ("grpc.so_reuseport", 0)

MAX_DETAILS_CHARS = 1000  # a status travels in the trailers, whose size gRPC limits (8 KiB by default)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, details = _untrimmed_status_for(exc)
    if len(details) > MAX_DETAILS_CHARS:
        details = details[:MAX_DETAILS_CHARS] + f"... ({len(details)} characters)"
    return code, details


def _untrimmed_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DuoError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, grpc.RpcError):
        if callable(getattr(exc, "code", None)):
            # An error of the call the drafter made to the verifier: relay its status, say where it came from.
            return exc.code(), f"verify service: {exc.code().name}: {exc.details()}"
        # Our own request stream broke: the peer cancelled or went away. Nothing to report.
        return grpc.StatusCode.CANCELLED, "the caller cancelled the call"
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def translate_errors(method: Callable) -> Callable:
    """Turn DuoError (and anything unexpected) into a gRPC status, for unary and streaming handlers.

    Handlers raise; only this wrapper calls ``context.abort`` (which itself raises a bare Exception).
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes a status
                context.abort(*_status_for(exc))

        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status_for(exc))

    return unary_wrapper


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings of one service, built from its CLI flags."""

    max_sessions: int = 64
    idle_timeout_s: float | None = None  # sessions whose peer keeps the service waiting longer are closed
    max_message_bytes: int = MAX_MESSAGE_BYTES
    tls: ServerTls | None = None
    auth_token: str | None = None
    health_port: int | None = None  # a plaintext health-only port (kubelet probes cannot speak TLS)
    max_connection_age_s: float | None = None  # make clients re-resolve DNS now and then (new replicas)
    connection_age_grace_s: float = 3600.0


class PortUnavailable(StartupError):
    """The address to listen on cannot be bound (its port is taken)."""


def _listen(add_port: Callable[[str], int], address: str, flag: str) -> int:
    """``add_port(address)``, refusing a taken port in one line; checked first with a plain socket, since
    gRPC's own refusal also prints a C-core log on stderr."""
    host, port = address.rsplit(":", 1)
    taken = PortUnavailable(f"cannot listen on {address}: port {port} is in use (another duo service?): stop "
                            f"that process, or choose another port with {flag} (0 picks a free one)")
    if _port_taken(host, int(port)):
        raise taken
    try:
        bound = add_port(address)
    except RuntimeError as exc:  # a race with another process, or an address this machine does not have
        raise PortUnavailable(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise taken
    return bound


def _port_taken(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (any port is free for port 0)."""
    if port == 0:
        return False
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # gRPC names an address it cannot resolve itself
    for family, kind, protocol, _, socket_address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener refuses it, TIME_WAIT not
            try:
                probe.bind(socket_address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


class ServiceServer:
    """A gRPC server with health (NOT_SERVING until ``mark_serving``), reflection, optional TLS, bearer
    token and metrics, and a graceful stop."""

    def __init__(self, service_names: list[str], options: ServerOptions = ServerOptions(),
                 metrics: ServiceMetrics | None = None):
        self.options = options
        interceptors = []
        if metrics is not None:
            interceptors.append(ErrorCountingInterceptor(metrics.count_error))
        if options.auth_token:
            interceptors.append(BearerTokenInterceptor(options.auth_token))
        channel_options = [
            NO_PORT_SHARING,
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            *keepalive.SERVER_OPTIONS,
        ]
        if options.max_connection_age_s:
            channel_options += [
                ("grpc.max_connection_age_ms", int(options.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(options.connection_age_grace_s * 1000)),
            ]
        # Every session holds a worker thread for its stream; keep spare ones for health and info calls.
        workers = options.max_sessions + 8
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors,
                                  options=channel_options)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._health_server = None
        if options.health_port is not None:
            self._health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[NO_PORT_SHARING])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self._service_names = service_names
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._status_lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()

    def bind(self, address: str) -> int:
        """Listen on ``address`` (TLS when configured); returns the bound port. A port something else listens on
        is refused with PortUnavailable."""
        port = _listen(self._add_port, address, "--port")
        if self._health_server is not None:
            host = address.rsplit(":", 1)[0]
            _listen(self._health_server.add_insecure_port, f"{host}:{self.options.health_port}", "--health-port")
        return port

    def _add_port(self, address: str) -> int:
        if self.options.tls is not None:
            return self.server.add_secure_port(address, self.options.tls.credentials())
        return self.server.add_insecure_port(address)

    def start(self) -> None:
        self.server.start()
        if self._health_server is not None:
            self._health_server.start()

    def mark_serving(self) -> None:
        self.set_serving(True)

    def set_serving(self, serving: bool) -> None:
        """Health SERVING, or NOT_SERVING (e.g. while a service it needs is unreachable); once stopping, it
        stays NOT_SERVING."""
        with self._status_lock:
            if not self._stopping:
                self._set_status(health_pb2.HealthCheckResponse.SERVING if serving
                                 else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_status(self, status) -> None:
        for name in ["", *self._service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within grace_s."""
        with self._status_lock:
            self._stopping = True
            self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait()
        if self._health_server is not None:
            self._health_server.stop(0)
        self._stopped.set()

    def serve_until_signal(self, grace_s: float, on_stop: Callable[[], None] | None = None) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully; ``on_stop`` starts at the signal too, beside this
        server's drain (another server of the service draining at the same time)."""
        def on_signal(signum, _frame):
            log.info("signal %d: draining for up to %.0f s", signum, grace_s)
            threading.Thread(target=self.stop, args=(grace_s,), daemon=True).start()
            if on_stop is not None:
                threading.Thread(target=on_stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._stopped.wait()
