"""HTTP/2 keepalive for every duo connection: a peer that vanished without closing its connection (power
lost, network cut, a frozen VM) is noticed in seconds instead of at the next deadline, and its sessions end.

Clients ping every CLIENT_PING_S, also on idle connections (the draft service's channel to its verifier
follows the verifier's health with it), and drop the connection when an ack takes longer than
PING_TIMEOUT_S; servers ping their clients every SERVER_PING_S and accept clients' pings that often.
"""

CLIENT_PING_S = 10
SERVER_PING_S = 20
PING_TIMEOUT_S = 5

CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", CLIENT_PING_S * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_S * 1000),  # else any ping may wait a minute for its ack
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
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
