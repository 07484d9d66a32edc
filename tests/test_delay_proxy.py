"""The delay proxy adds the round trip it promises, and keeps every byte in order."""

import asyncio
import socket
import time

import pytest

from benchmarks.delay_proxy import serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def measure(delay_s: float, round_trips: int = 5) -> tuple[list[float], bytes, bytes]:
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream = echo_server.sockets[0].getsockname()[:2]
    listen = ("127.0.0.1", free_port())
    started = asyncio.Event()
    proxy = asyncio.create_task(serve(listen, upstream, delay_s, started))
    await started.wait()
    reader, writer = await asyncio.open_connection(*listen)
    times = []
    for index in range(round_trips):
        sent = time.perf_counter()
        writer.write(b"ping%d" % index)
        await writer.drain()
        await reader.readexactly(len(b"ping%d" % index))
        times.append(time.perf_counter() - sent)
    # many chunks back to back: all bytes, in order
    payload = bytes(range(256)) * 2000
    for offset in range(0, len(payload), 1000):
        writer.write(payload[offset:offset + 1000])
    await writer.drain()
    received = await reader.readexactly(len(payload))
    writer.close()
    proxy.cancel()
    echo_server.close()
    return times, payload, received


@pytest.mark.parametrize("one_way_ms", [0, 10, 25])
def test_round_trip_grows_by_twice_the_one_way_delay(one_way_ms):
    times, payload, received = asyncio.run(measure(one_way_ms / 1000))
    median = sorted(times)[len(times) // 2]
    expected = 2 * one_way_ms / 1000
    assert expected <= median < expected + 0.015, (median, expected)
    assert received == payload
