"""Options and start-up shared by ``duo-verify serve`` and ``duo-draft serve``.

Every option can also come from the environment as ``{PREFIX}_{OPTION}`` (e.g. DUO_VERIFY_PORT), read by
click here in the CLI and nowhere else.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from duo.common.errors import InvalidArgument, StartupError
from duo.common.metrics import ServiceMetrics
from duo.common.rpc import PortUnavailable, ServerOptions, ServiceServer
from duo.common.security import ServerTls, read_token

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@dataclass(frozen=True)
class ServeSettings:
    """The common serve options, gathered."""

    host: str
    port: int
    threads: int | None
    grace_s: float
    port_file: Path | None
    log_level: str
    metrics_port: int | None
    server: ServerOptions
    max_batch_tokens: int = 256  # forward passes shared by sessions (duo.common.pass_scheduler)
    max_batch_sessions: int = 64
    parent_pid: int | None = None  # stop when this parent process is gone (embedded mode's children)

    def address(self) -> str:
        return f"{self.host}:{self.port}"


def common_serve_options(env_prefix: str):
    """Add the options every service has; the command receives them as one ``settings`` argument."""

    def option(name: str, **kwargs):
        envvar = f"{env_prefix}_{name.lstrip('-').replace('-', '_').upper()}"
        return click.option(name, envvar=envvar, show_default=True, show_envvar=True, **kwargs)

    options = [
        option("--host", default="0.0.0.0", help="Address to listen on."),
        option("--port", type=click.IntRange(0, 65535), default=50051, help="gRPC port (0 picks a free one)."),
        option("--threads", type=click.IntRange(1, 512), default=None, help="torch CPU threads."),
        option("--max-sessions", type=click.IntRange(1, 100000), default=64,
               help="Concurrent sessions; more are refused with RESOURCE_EXHAUSTED."),
        option("--idle-timeout-s", type=click.FloatRange(0.1), default=60.0,
               help="Close a session whose peer keeps the service waiting this long (no opening message, no next "
                    "proposal), freeing its thread and KV cache."),
        option("--grace-s", type=click.FloatRange(0), default=30.0,
               help="Seconds in-flight sessions get to finish after SIGTERM."),
        option("--port-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
               help="Write the bound port here once listening."),
        option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"),
        option("--metrics-port", type=click.IntRange(0, 65535), default=None,
               help="Serve Prometheus /metrics over HTTP on this port."),
        option("--health-port", type=click.IntRange(1, 65535), default=None,
               help="Also serve grpc.health.v1 alone, in plaintext, on this port (for probes when TLS is on)."),
        option("--tls-cert", type=_FILE, default=None, help="Server certificate (PEM); enables TLS."),
        option("--tls-key", type=_FILE, default=None, help="Server private key (PEM)."),
        option("--tls-ca", type=_FILE, default=None, help="CA for client certificates: enables mutual TLS."),
        option("--auth-token-file", type=_FILE, default=None,
               help="Require 'authorization: Bearer <token>' with the token in this file."),
        option("--max-message-mb", type=click.IntRange(1, 2047), default=64, help="Largest gRPC message."),
        option("--max-connection-age-s", type=click.FloatRange(0), default=None,
               help="Close client connections after this long (clients re-resolve DNS and find new replicas)."),
        option("--max-batch-tokens", type=click.IntRange(1, 65536), default=256,
               help="Tokens one forward pass takes at most, over all sessions (a larger piece of work runs alone)."),
        option("--max-batch-sessions", type=click.IntRange(1, 4096), default=64,
               help="Sessions one forward pass serves at most (1: each pass serves one session)."),
        option("--parent-pid", type=click.IntRange(1), default=None,
               help="Stop (as on SIGTERM) when this service's parent process, PID, exits: a client that starts "
                    "the service as its child never leaves it behind, even when killed."),
    ]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(host, port, threads, max_sessions, idle_timeout_s, grace_s, port_file, log_level, metrics_port,
                    health_port, tls_cert, tls_key, tls_ca, auth_token_file, max_message_mb, max_connection_age_s,
                    max_batch_tokens, max_batch_sessions, parent_pid, **rest):
            if (tls_cert is None) != (tls_key is None):
                raise click.UsageError("--tls-cert and --tls-key go together")
            if tls_ca is not None and tls_cert is None:
                raise click.UsageError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
            try:
                token = read_token(auth_token_file)
            except InvalidArgument as exc:
                raise click.UsageError(str(exc)) from exc
            server = ServerOptions(
                max_sessions=max_sessions,
                idle_timeout_s=idle_timeout_s,
                max_message_bytes=max_message_mb * 1024 * 1024,
                tls=ServerTls(tls_cert, tls_key, tls_ca) if tls_cert else None,
                auth_token=token,
                health_port=health_port,
                max_connection_age_s=max_connection_age_s or None,
                connection_age_grace_s=max(grace_s, 3600.0),
            )
            settings = ServeSettings(host, port, threads, grace_s, port_file, log_level, metrics_port, server,
                                     max_batch_tokens, max_batch_sessions, parent_pid)
            try:
                return command(settings=settings, **rest)
            except StartupError as exc:  # one line naming the problem and the fix, no traceback
                raise click.ClickException(str(exc)) from exc

        return functools.reduce(lambda cmd, opt: opt(cmd), reversed(options), wrapper)

    return decorate


def setup_process(settings: ServeSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    if settings.parent_pid is not None:
        stop_with_parent(settings.parent_pid)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)


def exit_drained() -> NoReturn:
    """End the process once its service has drained and closed: at once, skipping the interpreter's
    finalisation, which takes a second or more with a model loaded (its objects freed one by one) and serves
    nothing (no file is open for writing; logs and standard streams are flushed here). A client that stops
    its embedded services waits for this exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Send this process SIGTERM once ``parent_pid`` is no longer its parent: a parent killed outright (SIGKILL)
    stops nothing itself, and its orphans are handed to another parent. Before serving, SIGTERM ends the
    process at once; while serving, it drains as usual."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        logging.getLogger(__name__).info("parent process %d is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_server(settings: ServeSettings, service_name: str, add_servicer, servicer, metrics: ServiceMetrics,
                 model: str) -> ServiceServer:
    """Listen (health NOT_SERVING until the caller has loaded its model), announce the port, serve metrics."""
    server = ServiceServer([service_name], settings.server, metrics)
    add_servicer(servicer, server.server)
    bound = server.bind(settings.address())
    server.start()
    announce_port(settings.port_file, bound)  # readiness is health's job; the port is known now
    log = logging.getLogger(__name__)
    if settings.metrics_port is not None:
        try:
            metrics.serve(settings.metrics_port, settings.host)
        except OSError as exc:
            raise PortUnavailable(f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror}: choose "
                                  "another --metrics-port") from exc
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    log.info("%s listening on %s:%d%s; loading %s", service_name, settings.host, bound,
             " (TLS)" if settings.server.tls else "", model)
    return server


def announce_port(port_file: Path | None, port: int) -> None:
    """Write the bound port atomically, so a parent process can wait for the file."""
    if port_file is None:
        return
    staging = port_file.with_suffix(".tmp")
    staging.write_text(str(port))
    os.replace(staging, port_file)


def log_batching(model_batches: bool, settings: ServeSettings) -> None:
    """Say whether sessions will share forward passes."""
    if settings.max_batch_sessions == 1:
        how = "no (--max-batch-sessions 1)"
    elif not model_batches:
        how = "no: this model runs one session per pass (sessions share passes on duo's lean CPU runtime)"
    else:
        how = f"yes, up to {settings.max_batch_sessions} sessions and {settings.max_batch_tokens} tokens per pass"
    logging.getLogger(__name__).info("sessions share forward passes: %s", how)
