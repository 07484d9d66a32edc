"""HTTP/2 keepalive: a peer that vanishes without closing its connection (here: a network path that stops
carrying anything) is noticed in seconds, by the client (its call fails UNAVAILABLE) and by the server (the
session and its KV cache are freed), instead of never."""

import socket
import threading
import time

import grpc

from duo.common import keepalive
from duo.common.security import ChannelSecurity
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import verify_server
from tests.polling import eventually
from tests.tiny_models import save_pair


class FreezableProxy:
    """Forwards TCP between a listening port and ``upstream`` until ``freeze()``; then carries nothing and
    closes nothing, as a cut cable would."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(self.upstream)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while data := source.recv(65536):
            if self.frozen.is_set():
                continue  # swallowed: no byte crosses, no connection closes
            sink.sendall(data)


def test_a_vanished_peer_is_noticed_on_both_sides(tmp_path):
    pair = save_pair(tmp_path, "llama")
    with verify_server(pair.target_dir) as (address, sessions):
        host, port = address.rsplit(":", 1)
        proxy = FreezableProxy((host, int(port)))
        release = threading.Event()

        def opening_then_wait():
            yield pb.VerifyRequest(open=pb.VerifyOpen(prompt_token_ids=[1, 5, 9]))
            release.wait(120)

        with ChannelSecurity().channel(f"127.0.0.1:{proxy.port}") as channel:
            call = duo_pb2_grpc.VerifierStub(channel).Verify(opening_then_wait(), timeout=120)
            assert next(call).WhichOneof("message") == "prefilled"
            assert len(sessions) == 1
            proxy.freeze()
            frozen_at = time.monotonic()
            try:
                next(call)
                raise AssertionError("the call should have failed")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            client_noticed_s = time.monotonic() - frozen_at
            limit_s = keepalive.CLIENT_PING_S + keepalive.PING_TIMEOUT_S + 5
            assert client_noticed_s < limit_s, client_noticed_s
            server_limit_s = keepalive.SERVER_PING_S + keepalive.PING_TIMEOUT_S + 5
            assert eventually(lambda: len(sessions) == 0, timeout_s=server_limit_s)  # freed by the server's ping
            release.set()


class Ended(grpc.RpcError):
    """A call's end as a client sees it."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_dropped_connection_is_told_from_a_peers_answer():
    assert keepalive.connection_lost(Ended(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    # what gRPC's core reports when the connection drops mid-stream (a killed server), though it means the same
    assert keepalive.connection_lost(Ended(grpc.StatusCode.UNKNOWN, "Stream removed"))
    assert not keepalive.connection_lost(Ended(grpc.StatusCode.UNKNOWN, "Exception iterating responses"))
    assert not keepalive.connection_lost(Ended(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt"))
    assert not keepalive.connection_lost(Ended(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sessions"))

