"""Serving the HTTP API with uvicorn on a thread of its own, beside the gRPC server, and stopping it with
the service (in-flight streams get the grace period to finish)."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time

import uvicorn

from duo.common.rpc import PortUnavailable
from duo.common.security import ServerTls

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, app, host: str, port: int, grace_s: float = 30.0, tls: ServerTls | None = None):
        """Listen on ``host:port`` now (0 picks a free port): a taken port is refused here, in one line. With
        ``tls`` (the gRPC server's certificate), HTTPS, requiring client certificates where it has a CA."""
        tls_options = {}
        if tls is not None:
            tls_options = dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key),
                               ssl_ca_certs=str(tls.client_ca) if tls.client_ca else None,
                               ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=grace_s, **tls_options)
        config.load()  # here, so a certificate it cannot read is this thread's error
        self._socket = _listen(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-api", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve, returning once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP API did not start (see the log above)")
            time.sleep(0.01)

    def stop(self) -> None:
        """Refuse new connections, let in-flight requests finish within the grace period, then return."""
        self._server.should_exit = True
        self._thread.join()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener refuses it, TIME_WAIT does not
    try:
        listener.bind((host.strip("[]"), port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(f"cannot serve the HTTP API on {host}:{port}: the port is in use: choose another "
                                  "--http-port") from exc
        raise PortUnavailable(f"cannot serve the HTTP API on {host}:{port}: {exc.strerror}") from exc
    listener.listen(128)
    return listener
