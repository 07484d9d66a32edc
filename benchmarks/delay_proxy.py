"""A userspace TCP proxy that delays every chunk by a fixed one-way time, keeping order.

This kernel has no ``netem`` qdisc, so added network latency comes from here: put the proxy on the path
between the draft service and the verify service and each direction gains ``--delay-ms``, i.e. the round
trip gains twice that. Chunks are forwarded as they arrive, each no earlier than its arrival time plus the
delay, so bandwidth is not throttled, only latency added.

    python -m benchmarks.delay_proxy --listen 10.77.0.2:50061 --upstream 10.77.0.1:50051 --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time

log = logging.getLogger("duo.delay_proxy")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader → writer, each chunk held until ``arrival + delay_s``; order is kept by one queue."""
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    delivery = asyncio.create_task(deliver())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, chunk))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((0.0, None))
        with contextlib.suppress(ConnectionError, OSError):
            await delivery


async def _handle(client_reader, client_writer, upstream: tuple[str, int], delay_s: float) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*upstream)
    except OSError as exc:
        log.warning("cannot reach upstream %s:%d: %s", *upstream, exc)
        client_writer.close()
        return
    await asyncio.gather(
        _pump(client_reader, upstream_writer, delay_s),
        _pump(upstream_reader, client_writer, delay_s),
    )
    for writer in (client_writer, upstream_writer):
        writer.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int], delay_s: float,
                started: asyncio.Event | None = None) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, upstream, delay_s), *listen)
    log.info("proxy %s:%d → %s:%d, +%.1f ms each way", *listen, *upstream, delay_s * 1000)
    if started is not None:
        started.set()
    async with server:
        await server.serve_forever()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each direction")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(serve(args.listen, args.upstream, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
