"""TLS, mutual TLS and bearer tokens for every hop (client → draft → verify).

Servers take a certificate and key, and with a CA they require client certificates signed by it (mutual
TLS). Channels take the CA that signed the server, and a client certificate for mutual TLS. A bearer
token, when configured, travels as ``authorization: Bearer …`` call metadata and is checked by one server
interceptor (``duo.common.interceptors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from duo.common import keepalive
from duo.common.errors import InvalidArgument


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from exc


def read_token(path: Path | None) -> str | None:
    """The token in a file (surrounding whitespace dropped); None without a file."""
    data = _read(path, "auth token file")
    if data is None:
        return None
    token = data.decode().strip()
    if not token:
        raise InvalidArgument(f"auth token file {path} is empty")
    return token


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate signed by it

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.client_ca, "client CA"),
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a server: plaintext, or TLS with a CA (and a client certificate for mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("a client certificate needs both --…-tls-cert and --…-tls-key")

    @property
    def uses_tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: list[tuple] | None = None) -> grpc.Channel:
        """A channel to ``address`` with these credentials, keepalive (``duo.common.keepalive``) and ``options``."""
        options = [*keepalive.CLIENT_OPTIONS, *(options or [])]
        if not self.uses_tls:
            return grpc.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA"),
            private_key=_read(self.key, "client TLS key"),
            certificate_chain=_read(self.cert, "client TLS certificate"),
        )
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(address, credentials, options=options)
