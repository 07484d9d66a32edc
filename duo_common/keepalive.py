"""HTTP/2 keepalive and reconnection for every duo connection: a peer that vanished without closing its
connection (power lost, network cut, a frozen VM) is noticed in seconds instead of at the next deadline, and
its sessions end; a peer that comes back is found again within seconds. ``connection_lost`` tells a call
that ended with its connection from one its peer answered, and ``wait_connected`` waits for a peer to listen
again.

Clients ping every CLIENT_PING_S, also on idle connections (the draft service's channel to its verifier
follows the verifier's health with it), and drop the connection when an ack takes longer than
PING_TIMEOUT_S; servers ping their clients every SERVER_PING_S and accept clients' pings that often.
"""

import grpc

CLIENT_PING_S = 10
SERVER_PING_S = 20
PING_TIMEOUT_S = 5

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5

CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", CLIENT_PING_S * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_S * 1000),  # else any ping may wait a minute for its ack
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A lost peer is redialled within seconds of coming back (gRPC's default backoff grows to two minutes, so
    # after a few restarts a resuming session would wait long after its peer is back, or give up).
    ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_FIRST_S * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(RECONNECT_FIRST_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_S * 1000),
]

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", SERVER_PING_S * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_S * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # clients' pings are welcome this often (gRPC's default sends a GOAWAY to clients pinging under 5 minutes)
    ("grpc.http2.min_recv_ping_interval_without_data_ms", CLIENT_PING_S * 1000 // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_S * 1000 // 2),
]


def connection_lost(error: grpc.RpcError) -> bool:
    """Did the call end because its connection did (the peer died, restarted or became unreachable), rather
    than by the peer's answer? UNAVAILABLE, and UNKNOWN "Stream removed", which gRPC's core reports for a
    connection that drops in the middle of a stream (grpc/grpc#34076): both mean "try again"."""
    code = error.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.UNKNOWN and "stream removed" in (error.details() or "").lower())


def wait_connected(channel: grpc.Channel, timeout_s: float) -> bool:
    """Until ``channel`` is connected (a restarting peer listens again), at most ``timeout_s``: whether it is."""
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.0, timeout_s))
    except grpc.FutureTimeoutError:
        return False
    return True
