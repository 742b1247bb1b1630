"""node.http1: the HTTP/1.1 keep-alive transport, against real servers on loopback.

Each test runs on both the stock asyncio loop and uvloop (production's), since the
transport leans on Protocol/Transport details (pause_reading, EOF, aborts) that the
two implement separately. Servers are aiohttp apps where the HTTP is ordinary and
raw asyncio servers scripted byte by byte (``answer``) where it is not.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop
from aiohttp import web

from hapax import (
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    ReadError,
    StreamIdleTimeout,
    UpstreamRequest,
)
from hapax.config._config import ProviderConfig, Timeouts
from node.http1 import BUFFER_HIGH, Http1Transport

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
FAST = Timeouts(connect=2, first_byte=2, total=5, stream_idle=2)

Run = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    factory = LOOPS[request.param]

    def runner(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(asyncio.wait_for(fn(), 20))

    return runner


def req(url: str, body: bytes | None = b"{}", *, method: str = "POST", timeouts: Timeouts = FAST,
        headers: dict[str, str] | None = None) -> UpstreamRequest:
    h = {"content-type": "application/json"} if headers is None else headers
    return UpstreamRequest(method, url, h, body, timeouts)


@asynccontextmanager
async def client(pool_size: int = 10) -> AsyncIterator[Http1Transport]:
    t = Http1Transport(ProviderConfig(type="openai", pool_size=pool_size))
    try:
        yield t
    finally:
        await t.aclose()


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


async def fetch(t: Http1Transport, url: str, body: bytes = b"{}", *, stream: bool = False,
                timeouts: Timeouts = FAST) -> bytes:
    """Send one request and return its body, taken whole by ``read()`` or chunk by chunk."""
    resp = await t.send(req(url, body, timeouts=timeouts))
    try:
        return await (collect(resp.iter_chunks()) if stream else resp.read())
    finally:
        resp.close()


# -- servers -----------------------------------------------------------------------------------


class AppServer:
    """An aiohttp app on 127.0.0.1 posting every path to ``handler``; remembers each request's client port."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = web.Application()
        self.app.router.add_post("/{tail:.*}", handler)
        self.peers: list[int] = []
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> AppServer:
        @web.middleware
        async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.peers.append(peer[1] if peer else -1)
            return await handler(request)

        self.app.middlewares.append(record)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A raw TCP server running ``script`` per connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/x"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Aborting the sockets ends the scripts (their reads see EOF, writes fail);
        # cancelling their tasks instead makes asyncio log an error per task.
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        await self._server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (framed by content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


#: After the scripted steps: close the connection, hold it open until the client hangs
#: up, reset it (RST), or loop to answer the connection's next request the same way.
Then = Literal["close", "hold", "reset", "loop"]


def answer(*steps: bytes | float, then: Then = "close", seen: list[bytes] | None = None) -> Script:
    """Per connection: read a request (its head appended to ``seen``), then write each bytes
    step, sleep each float step (seconds), and finish as ``then`` says."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each write leaves at once, so a step is a segment of its own (1-byte tests need it).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head, _ = await read_request(reader)
            if seen is not None:
                seen.append(head)
            for step in steps:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                else:
                    await asyncio.sleep(step)
            if then != "loop":
                break
        if then == "hold":
            await reader.read()
        elif then == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    return script


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def every(seconds: float, data: bytes, times: int) -> list[bytes | float]:
    """Steps for ``answer`` that write ``data`` after each pause of ``seconds``, ``times`` times."""
    return [seconds, data] * times


# -- bodies ------------------------------------------------------------------------------------


def test_content_length_body_and_request_bytes(run: Run) -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def echo(request: web.Request) -> web.Response:
            seen["headers"] = dict(request.headers)
            seen["path"] = request.path_qs
            body = await request.read()
            return web.Response(body=body[::-1], headers={"X-Thing": "1", "Retry-After": "3"}, status=201)

        async with AppServer(echo) as srv, client() as t:
            resp = await t.send(req(srv.url + "/v1/chat?a=b c", b"hello",
                                    headers={"authorization": "Bearer k", "x-request-id": "r1"}))
            assert resp.status == 201
            assert resp.headers["x-thing"] == "1"
            assert resp.headers.get("retry-after") == "3"
            assert await resp.read() == b"olleh"
            resp.close()
            resp.close()  # twice is safe
        h = {k.lower(): v for k, v in seen["headers"].items()}
        assert h["authorization"] == "Bearer k" and h["x-request-id"] == "r1"
        assert h["content-length"] == "5"
        assert h["accept-encoding"] == "identity"
        assert h["host"] == srv.url.removeprefix("http://")
        assert seen["path"] == "/v1/chat?a=b%20c"

    run(main)


def test_get_without_body_sends_no_content_length(run: Run) -> None:
    async def main() -> None:
        heads: list[bytes] = []
        async with RawServer(answer(ok(b"[]"), seen=heads)) as srv, client() as t:
            resp = await t.send(req(srv.url, None, method="GET", headers={}))
            assert await resp.read() == b"[]"
            resp.close()
        assert heads[0].startswith(b"GET /v1/x HTTP/1.1\r\n")
        assert b"content-length" not in heads[0].lower()

    run(main)


def test_chunked_body_streams_and_reads(run: Run) -> None:
    events = b"".join(b"data: %d\n\n" % i for i in range(5))

    async def main() -> None:
        async def sse(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp

        async with AppServer(sse) as srv, client() as t:
            resp = await t.send(req(srv.url + "/s"))
            chunks = [c async for c in resp.iter_chunks()]
            resp.close()
            assert b"".join(chunks) == events
            assert len(chunks) >= 2  # delivered as they came, not all at the end
            assert await fetch(t, srv.url + "/s") == events
        assert len(set(srv.peers)) == 1  # the chunked response left the connection reusable

    run(main)


@pytest.mark.parametrize("kind", ["length", "chunked", "eof"])
def test_response_split_into_single_bytes(run: Run, kind: str) -> None:
    body = b'{"id":"x","choices":[]}'
    if kind == "length":
        reply = ok(body, b"x-a: b\r\n")
    elif kind == "chunked":
        reply = (b"HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                 + chunk(body[:5]) + chunk(body[5:]) + b"0\r\n\r\n")
    else:
        reply = b"HTTP/1.1 200 OK\r\nx-a: b\r\n\r\n" + body  # ends where the server closes
    steps = [step for i in range(len(reply)) for step in (reply[i : i + 1], 0.001)]

    async def main() -> None:
        async with RawServer(answer(*steps)) as srv, client() as t:
            resp = await t.send(req(srv.url))
            assert resp.status == 200 and resp.headers["x-a"] == "b"
            assert await collect(resp.iter_chunks()) == body
            resp.close()

    run(main)


# -- keep-alive and the pool ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "then", "body", "pause", "connections"),
    [
        # Interim responses are skipped, and the connection carries the next request.
        pytest.param([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"ok")],
                     "loop", b"ok", 0, 1, id="interim-1xx-skipped"),
        # A body with neither length nor chunking ends at the close: the second request needs a new connection.
        pytest.param([b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ", 0.02, b"part two"],
                     "close", b"part one, part two", 0, 2, id="close-delimited-body"),
        # Held open after "connection: close": the client must not wait for the close.
        pytest.param([ok(b"bye", b"connection: close\r\n")], "hold", b"bye", 0, 2, id="connection-close-honoured"),
        # Keep-alive by the headers, then dropped while idle (the pause outlasts the server).
        pytest.param([ok(b"one"), 0.05], "close", b"one", 0.2, 2, id="server-closing-idle-noticed"),
        # Bytes nobody asked for after a response make the idle connection unusable.
        pytest.param([ok(b"x"), 0.02, b"HTTP/1.1 200 OK\r\n"], "loop", b"x", 0.1, 2, id="unsolicited-bytes-drop-it"),
    ],
)
def test_connection_reuse(run: Run, steps: list[bytes | float], then: Then, body: bytes, pause: float,
                          connections: int) -> None:
    async def main() -> None:
        async with RawServer(answer(*steps, then=then)) as srv, client() as t:
            for _ in range(2):
                resp = await t.send(req(srv.url))
                assert resp.status == 200 and "link" not in resp.headers
                assert await resp.read() == body
                resp.close()
                await asyncio.sleep(pause)
        assert srv.connections == connections

    run(main)


def test_keep_alive_reuses_one_connection(run: Run) -> None:
    async def main() -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async with AppServer(hello) as srv, client() as t:
            for _ in range(3):
                assert await fetch(t, srv.url + "/h") == b'{"ok": true}'
        assert len(srv.peers) == 3 and len(set(srv.peers)) == 1

    run(main)


def test_unread_stream_closed_early_is_not_reused(run: Run) -> None:
    async def main() -> None:
        # Held until the client hangs up.
        async with RawServer(answer(CHUNKED + chunk(b"hello"), then="hold")) as srv, client() as t:
            resp = await t.send(req(srv.url))
            async for c in resp.iter_chunks():
                assert c == b"hello"
                break
            resp.close()
            await asyncio.sleep(0.05)
            assert srv.open == 0  # the client closed it

    run(main)


def test_pool_is_bounded_and_concurrent_requests_all_answer(run: Run) -> None:
    async def main() -> None:
        async def echo_slowly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                _, body = await read_request(reader)
                await asyncio.sleep(0.02)
                writer.write(ok(body))
                await writer.drain()

        async with RawServer(echo_slowly) as srv, client(pool_size=3) as t:
            async def one(i: int) -> None:
                assert await fetch(t, srv.url, b"%d" % i) == b"%d" % i

            await asyncio.gather(*(one(i) for i in range(30)))
        assert srv.max_open <= 3
        assert srv.connections == 3  # reused, not reopened

    run(main)


def test_many_concurrent_requests_against_aiohttp(run: Run) -> None:
    async def main() -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.Response(body=await request.read())

        async with AppServer(echo) as srv, client(pool_size=8) as t:
            async def one(i: int) -> None:
                body = b"x" * (i * 97) + b"%d" % i
                assert await fetch(t, srv.url + "/e", body, stream=i % 2 == 0) == body

            await asyncio.gather(*(one(i) for i in range(200)))
        assert len(set(srv.peers)) <= 8

    run(main)


def test_pool_wait_counts_as_connect_timeout(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer(CHUNKED, then="hold")) as srv, client(pool_size=1) as t:
            held = await t.send(req(srv.url))  # occupies the only connection
            tight = Timeouts(connect=0.2, first_byte=5, total=5, stream_idle=5)
            with pytest.raises(ConnectTimeout):
                await t.send(req(srv.url, timeouts=tight))
            # A queued request that is cancelled leaves the queue and the count intact.
            waiting = asyncio.ensure_future(t.send(req(srv.url)))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert t._pool is not None and t._pool.count == 1
            # One queued behind the held stream gets the slot when it is dropped.
            waiting = asyncio.ensure_future(t.send(req(srv.url)))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            held.close()  # body unread: dropped, which frees the slot
            resp = await waiting
            assert resp.status == 200
            resp.close()
            assert t._pool.count == 0

    run(main)


def test_queued_requests_are_served_in_order_and_origins_share_the_bound(run: Run) -> None:
    async def main() -> None:
        async with (RawServer(answer(ok(b"x"), then="loop")) as one, RawServer(answer(ok(b"y"), then="loop")) as two,
                    client(pool_size=1) as t):
            held = await t.send(req(one.url))
            order: list[int] = []

            async def queued(i: int) -> None:
                resp = await t.send(req(one.url))
                order.append(i)
                assert await resp.read() == b"x"
                resp.close()

            tasks = []
            for i in range(3):
                tasks.append(asyncio.ensure_future(queued(i)))
                await asyncio.sleep(0.01)
            assert await held.read() == b"x"
            held.close()  # complete: handed to the oldest waiter, not pooled
            await asyncio.gather(*tasks)
            assert order == [0, 1, 2]
            assert one.connections == 1
            # The other origin takes the one slot by closing the idle connection to the first.
            assert await fetch(t, two.url) == b"y"
            assert t._pool is not None and t._pool.count == 1

    run(main)


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["read", "iter_chunks"])
@pytest.mark.parametrize(
    ("steps", "then"),
    [
        pytest.param([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"], "close", id="content-length"),
        pytest.param([CHUNKED + chunk(b"half")], "close", id="chunked-no-last"),
        pytest.param([CHUNKED + b"4\r\nha"], "close", id="chunked-mid-chunk"),
        pytest.param([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nsome", 0.05], "reset", id="reset"),
    ],
)
def test_truncated_or_reset_body_is_a_read_error(run: Run, steps: list[bytes | float], then: Then,
                                                 stream: bool) -> None:
    async def main() -> None:
        async with RawServer(answer(*steps, then=then)) as srv, client() as t:
            resp = await t.send(req(srv.url))
            with pytest.raises(ReadError):
                await (collect(resp.iter_chunks()) if stream else resp.read())
            resp.close()

    run(main)


@pytest.mark.parametrize(
    ("reply", "then", "match"),
    [
        # The message is only given while waiting for the headers, i.e. inside send().
        pytest.param(b"HTTP/1.1 200", "close", "before responding", id="close-before-response"),
        # Held open, so it is the parser that fails the request, not the close.
        pytest.param(b"HELLO WORLD\r\n\r\n", "hold", "malformed", id="garbage"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n", "hold", "malformed", id="bad-length"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
                     "hold", "malformed", id="upgrade"),
    ],
)
def test_broken_response_head_is_a_read_error(run: Run, reply: bytes, then: Then, match: str) -> None:
    async def main() -> None:
        async with RawServer(answer(reply, then=then)) as srv, client() as t:
            with pytest.raises(ReadError, match=match):
                await fetch(t, srv.url)

    run(main)


def test_refused_is_a_connect_error(run: Run) -> None:
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        async with client() as t:
            with pytest.raises(ConnectError):
                await t.send(req(f"http://127.0.0.1:{port}/x"))
            assert t._pool is not None and t._pool.count == 0

    run(main)


def test_host_names_resolve_and_every_address_is_tried(run: Run) -> None:
    async def main() -> None:
        # "localhost" may resolve to ::1 first; the server listens on 127.0.0.1 only.
        async with RawServer(answer(ok(b"hi"), then="loop")) as srv, client() as t:
            assert await fetch(t, srv.url.replace("127.0.0.1", "localhost")) == b"hi"
            with pytest.raises(ConnectError):
                await t.send(req("http://no-such-host.invalid/x"))

    run(main)


def test_a_host_with_several_addresses_races_them(run: Run) -> None:
    async def main() -> None:
        # One address connects through the loop's own connect; several through happy eyeballs,
        # which moves on from one that refuses.
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        async with RawServer(answer(ok(b"hi"), then="loop")) as srv, client() as t:
            loop = asyncio.get_running_loop()
            real = loop.getaddrinfo

            async def two_addresses(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
                if host != "twice.test":  # uvloop's sock_connect resolves its address too
                    return await real(host, port, **kw)
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in (dead_port, port)]

            loop.getaddrinfo = two_addresses  # type: ignore[method-assign]
            assert await fetch(t, srv.url.replace("127.0.0.1", "twice.test")) == b"hi"
            assert t._pool is not None and t._pool.count == 1

    run(main)


def test_a_burst_on_a_cold_pool_looks_the_host_up_once(run: Run) -> None:
    async def main() -> None:
        # 20 requests at once on a new transport open 20 connections, all to one lookup's answer.
        async with RawServer(answer(0.05, ok(b"hi"), then="loop")) as srv, client(pool_size=20) as t:
            url = srv.url.replace("127.0.0.1", "localhost")
            assert await asyncio.gather(*(fetch(t, url) for _ in range(20))) == [b"hi"] * 20
            assert srv.connections == 20
            assert t._pool is not None and t._pool.addresses.lookups == 1

    run(main)


def test_addresses_are_looked_up_again_after_the_ttl_or_a_refused_connect(run: Run) -> None:
    async def main() -> None:
        async with client() as t:
            # The server closes after each answer and says so: a new connection each time.
            async with RawServer(answer(ok(b"hi", b"connection: close\r\n"))) as srv:
                url = srv.url.replace("127.0.0.1", "localhost")
                assert await fetch(t, url) == b"hi"
                assert t._pool is not None
                addresses = t._pool.addresses
                assert await fetch(t, url) == b"hi"
                assert addresses.lookups == 1  # within the TTL
                addresses.ttl = 0.0
                assert await fetch(t, url) == b"hi"
                assert addresses.lookups == 2  # past it
                addresses.ttl = 60.0
            with pytest.raises(ConnectError):  # the server is gone: the known address fails and is dropped
                await t.send(req(url))
            assert addresses.lookups == 2
            with pytest.raises(ConnectError):  # so the next connection looks the host up again
                await t.send(req(url))
            assert addresses.lookups == 3

    run(main)


def test_newline_in_a_header_is_refused(run: Run) -> None:
    async def main() -> None:
        async with client() as t:
            with pytest.raises(ValueError):
                await t.send(req("http://127.0.0.1:9/x", headers={"x-a": "1\r\nx-b: 2"}))

    run(main)


# -- timeouts ------------------------------------------------------------------------------------


def test_connect_timeout(run: Run) -> None:
    async def main() -> None:
        # A listener whose accept queue is full and never drained: further SYNs are
        # dropped, so connect() hangs, all on loopback.
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        await asyncio.sleep(0.05)
        try:
            async with client() as t:
                with pytest.raises(ConnectTimeout):
                    await t.send(req(f"http://127.0.0.1:{port}/x",
                                     timeouts=Timeouts(connect=0.3, first_byte=5, total=5, stream_idle=5)))
                assert t._pool is not None and t._pool.count == 0
        finally:
            for f in fillers:
                f.close()
            lsock.close()

    run(main)


def test_first_byte_timeout_drops_the_connection(run: Run) -> None:
    async def main() -> None:
        async with RawServer(answer(then="hold")) as srv, client() as t:  # never answers
            with pytest.raises(FirstByteTimeout):
                await t.send(req(srv.url, timeouts=Timeouts(connect=1, first_byte=0.2, total=5, stream_idle=5)))
            await asyncio.sleep(0.05)
            assert srv.open == 0
            assert t._pool is not None and t._pool.count == 0

    run(main)


def test_stream_idle_timeout(run: Run) -> None:
    async def main() -> None:
        # Three chunks within the idle gap, then silence.
        script = answer(CHUNKED + chunk(b"first"), *every(0.1, chunk(b"."), 3), then="hold")
        async with RawServer(script) as srv, client() as t:
            resp = await t.send(req(srv.url, timeouts=Timeouts(connect=1, first_byte=1, total=10, stream_idle=0.3)))
            got = []
            with pytest.raises(StreamIdleTimeout, match="idle"):
                async for c in resp.iter_chunks():
                    got.append(c)
            assert b"".join(got) == b"first..."
            resp.close()
            await asyncio.sleep(0.05)
            assert srv.open == 0

    run(main)


def test_total_deadline_bounds_streams_and_reads(run: Run) -> None:
    async def main() -> None:
        # A steady trickle, never idle, that lasts ten times the total deadline.
        script = answer(CHUNKED, *every(0.05, chunk(b"."), 80))
        tight = Timeouts(connect=1, first_byte=1, total=0.4, stream_idle=5)
        async with RawServer(script) as srv, client() as t:
            loop = asyncio.get_running_loop()
            start = loop.time()
            resp = await t.send(req(srv.url, timeouts=tight))
            with pytest.raises(StreamIdleTimeout):
                await collect(resp.iter_chunks())
            assert 0.35 < loop.time() - start < 1.5
            resp = await t.send(req(srv.url, timeouts=tight))
            with pytest.raises(StreamIdleTimeout, match="total"):
                await resp.read()

    run(main)


def test_cancellation_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc"
        async with (RawServer(answer(partial, then="hold")) as srv, RawServer(answer(then="hold")) as mute,
                    client() as t):
            resp = await t.send(req(srv.url))
            task = asyncio.ensure_future(resp.read())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            assert srv.open == 0
            assert t._pool is not None and t._pool.count == 0

            sending = asyncio.ensure_future(t.send(req(mute.url)))
            await asyncio.sleep(0.05)
            sending.cancel()  # while waiting for headers
            with pytest.raises(asyncio.CancelledError):
                await sending
            await asyncio.sleep(0.05)
            assert t._pool.count == 0

    run(main)


def test_lagging_consumer_pauses_reading(run: Run) -> None:
    total = 8 * BUFFER_HIGH
    piece = b"z" * 16384

    async def main() -> None:
        script = answer(CHUNKED, *[chunk(piece)] * (total // len(piece)), b"0\r\n\r\n", then="loop")
        async with RawServer(script) as srv, client() as t:
            resp = await t.send(req(srv.url))
            await asyncio.sleep(0.3)  # the consumer lags
            conn = resp._conn  # type: ignore[attr-defined]
            assert conn.buffered <= BUFFER_HIGH + 512 * 1024  # bounded, not the whole body
            got = 0
            async for c in resp.iter_chunks():
                got += len(c)
            assert got == total
            resp.close()
            assert len(await fetch(t, srv.url)) == total  # the connection is reusable afterwards
        assert srv.connections == 1

    run(main)


# -- TLS -----------------------------------------------------------------------------------------


def test_https_with_hostname_check(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # .ci/run installs the openssl command; without it this fails rather than skips.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    # create_default_context() loads the default verify paths, which honour SSL_CERT_FILE.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def main() -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(body=b"secure")

        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(cert, key)
        async with AppServer(hello, ssl_context=sctx) as srv, client() as t:
            for _ in range(2):
                assert await fetch(t, srv.url + "/h") == b"secure"
            assert t._pool is not None and t._pool.count == 1
            # Plain HTTP spoken to a TLS port, and TLS to a plain one, fail as connect errors.
            with pytest.raises((ConnectError, ReadError)):
                await t.send(req(f"http://127.0.0.1:{srv.port}/h"))

        async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the ClientHello: answer it in plain HTTP
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

        async with RawServer(not_tls) as plain, client() as t:
            with pytest.raises(ConnectError):
                await t.send(req(plain.url.replace("http://", "https://")))

    run(main)
