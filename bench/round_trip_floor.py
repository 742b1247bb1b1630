"""The CPU floor under shared state's per-request cost: one Redis round trip, and one write.

A lone request on Redis state pays one round trip (its reservation: the call
must wait for Redis's answer) and one write without a reply (its settlement).
This measures what those cost a client process that does nothing else, on the
machine at hand, against a redis-server it starts on a free loopback port:

- a blocking socket (``PING``, ``sendall`` then ``recv``): the kernel's share;
- an asyncio protocol on the stock loop and on uvloop (the node's): the kernel's
  share plus one sleep and wake-up of the event loop;
- a write after ``CLIENT REPLY OFF`` on uvloop, one per loop iteration.

    python -m bench.round_trip_floor [--n 20000]

The client is pinned to core 0 and redis-server to core 1, as in
``bench.state_cost``. CPU is the process's user+system time per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
from collections.abc import Awaitable, Callable

import uvloop

from .procs import pinned_redis

_PING = b"*1\r\n$4\r\nPING\r\n"
_REPLY_OFF = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def blocking(port: int, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n // 10):
            s.sendall(_PING)
            s.recv(64)
        c0 = _cpu()
        for _ in range(n):
            s.sendall(_PING)
            s.recv(64)
        return (_cpu() - c0) / n * 1e6


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(data)


async def _timed(n: int, one: Callable[[], Awaitable[object]]) -> float:
    for _ in range(n // 10):
        await one()
    c0 = _cpu()
    for _ in range(n):
        await one()
    return (_cpu() - c0) / n * 1e6


async def round_trips(port: int, n: int) -> float:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_Client, "127.0.0.1", port)

    async def one() -> bytes:
        proto.reply = loop.create_future()
        transport.write(_PING)
        return await proto.reply

    try:
        return await _timed(n, one)
    finally:
        transport.close()


async def writes(port: int, n: int) -> float:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(_Client, "127.0.0.1", port)
    transport.write(_REPLY_OFF)

    async def one() -> None:
        transport.write(_PING)
        await asyncio.sleep(0)  # one write per loop iteration, as a settlement goes

    try:
        return await _timed(n, one)
    finally:
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="operations per measurement")
    a = ap.parse_args()
    server = pinned_redis()
    try:
        print(f"blocking socket, round trip   {blocking(server.port, a.n):6.1f} us CPU")
        print(f"asyncio loop, round trip      {asyncio.run(round_trips(server.port, a.n)):6.1f} us CPU")
        print(f"uvloop, round trip            {uvloop.run(round_trips(server.port, a.n)):6.1f} us CPU")
        print(f"uvloop, write without a reply {uvloop.run(writes(server.port, a.n)):6.1f} us CPU")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
