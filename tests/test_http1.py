"""node.http1: the HTTP/1.1 keep-alive transport, against real servers on loopback.

Each test runs on both the stock asyncio loop and uvloop (production's), since the
transport leans on Protocol/Transport details (pause_reading, EOF, aborts) that the
two implement separately. Servers are aiohttp apps where the HTTP is ordinary and
raw asyncio servers scripted byte by byte where it is not.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

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
from hapax._config import ProviderConfig, Timeouts
from node.http1 import BUFFER_HIGH, Http1Transport

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
FAST = Timeouts(connect=2, first_byte=2, total=5, stream_idle=2)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, None]]], None]:
    factory = LOOPS[request.param]

    def runner(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(asyncio.wait_for(fn(), 20))

    return runner


def req(url: str, body: bytes | None = b"{}", *, method: str = "POST", timeouts: Timeouts = FAST,
        headers: dict[str, str] | None = None) -> UpstreamRequest:
    h = {"content-type": "application/json"} if headers is None else headers
    return UpstreamRequest(method, url, h, body, timeouts)


def transport(pool_size: int = 10) -> Http1Transport:
    return Http1Transport(ProviderConfig(type="openai", pool_size=pool_size))


# -- servers -----------------------------------------------------------------------------------


class AppServer:
    """An aiohttp app on 127.0.0.1 that remembers each request's client port."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.peers: list[int] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

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
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
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


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    for p in parts:
        out += b"%x\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n\r\n"


def serve_each(reply: bytes) -> Script:
    """Answer every request on a connection with ``reply`` (keep-alive)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()

    return script


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


# -- bodies ------------------------------------------------------------------------------------


def test_content_length_body_and_request_bytes(run: Any) -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def echo(request: web.Request) -> web.Response:
            seen["headers"] = dict(request.headers)
            seen["path"] = request.path_qs
            body = await request.read()
            return web.Response(body=body[::-1], headers={"X-Thing": "1", "Retry-After": "3"}, status=201)

        app = web.Application()
        app.router.add_post("/v1/chat", echo)
        async with AppServer(app) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url + "/v1/chat?a=b c", b"hello",
                                        headers={"authorization": "Bearer k", "x-request-id": "r1"}))
                assert resp.status == 201
                assert resp.headers["x-thing"] == "1"
                assert resp.headers.get("retry-after") == "3"
                assert await resp.read() == b"olleh"
                resp.close()
                resp.close()  # twice is safe
            finally:
                await t.aclose()
        h = {k.lower(): v for k, v in seen["headers"].items()}
        assert h["authorization"] == "Bearer k" and h["x-request-id"] == "r1"
        assert h["content-length"] == "5"
        assert h["accept-encoding"] == "identity"
        assert h["host"] == srv.url.removeprefix("http://")
        assert seen["path"] == "/v1/chat?a=b%20c"

    run(main)


def test_get_without_body_sends_no_content_length(run: Any) -> None:
    async def main() -> None:
        heads: list[bytes] = []

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(ok(b"[]"))
            await writer.drain()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url, None, method="GET", headers={}))
                assert await resp.read() == b"[]"
                resp.close()
            finally:
                await t.aclose()
        assert heads[0].startswith(b"GET /v1/x HTTP/1.1\r\n")
        assert b"content-length" not in heads[0].lower()

    run(main)


def test_chunked_body_streams_and_reads(run: Any) -> None:
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

        app = web.Application()
        app.router.add_post("/s", sse)
        async with AppServer(app) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url + "/s"))
                chunks = [c async for c in resp.iter_chunks()]
                resp.close()
                assert b"".join(chunks) == b"".join(b"data: %d\n\n" % i for i in range(5))
                assert len(chunks) >= 2  # delivered as they came, not all at the end
                resp = await t.send(req(srv.url + "/s"))
                assert await resp.read() == b"".join(b"data: %d\n\n" % i for i in range(5))
                resp.close()
            finally:
                await t.aclose()
            assert len(set(srv.peers)) == 1  # the chunked response left the connection reusable

    run(main)


@pytest.mark.parametrize("kind", ["length", "chunked", "eof"])
def test_response_split_into_single_bytes(run: Any, kind: str) -> None:
    body = b'{"id":"x","choices":[]}'
    if kind == "length":
        reply = ok(body, b"x-a: b\r\n")
    elif kind == "chunked":
        reply = chunked(body[:5], body[5:])
    else:
        reply = b"HTTP/1.1 200 OK\r\nx-a: b\r\n\r\n" + body

    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.001)
            if kind == "eof":
                writer.close()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                assert resp.status == 200 and resp.headers["x-a"] == "b"
                assert await collect(resp.iter_chunks()) == body
                resp.close()
            finally:
                await t.aclose()

    run(main)


def test_interim_1xx_is_skipped(run: Any) -> None:
    async def main() -> None:
        reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"ok")
        async with RawServer(serve_each(reply)) as srv:
            t = transport()
            try:
                for _ in range(2):
                    resp = await t.send(req(srv.url))
                    assert resp.status == 200 and "link" not in resp.headers
                    assert await resp.read() == b"ok"
                    resp.close()
            finally:
                await t.aclose()
            assert srv.connections == 1

    run(main)


def test_close_delimited_body(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"part two")
            await writer.drain()
            writer.close()

        async with RawServer(script) as srv:
            t = transport()
            try:
                for _ in range(2):  # the second needs a new connection
                    resp = await t.send(req(srv.url))
                    assert await resp.read() == b"part one, part two"
                    resp.close()
            finally:
                await t.aclose()
            assert srv.connections == 2

    run(main)


# -- keep-alive and the pool ---------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(run: Any) -> None:
    async def main() -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/h", hello)
        async with AppServer(app) as srv:
            t = transport()
            try:
                for _ in range(3):
                    resp = await t.send(req(srv.url + "/h"))
                    assert await resp.read() == b'{"ok": true}'
                    resp.close()
            finally:
                await t.aclose()
            assert len(srv.peers) == 3 and len(set(srv.peers)) == 1

    run(main)


def test_connection_close_header_is_honoured(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(ok(b"bye", b"connection: close\r\n"))
            await writer.drain()
            await reader.read()  # keep it open: the client must not wait for the close

        async with RawServer(script) as srv:
            t = transport()
            try:
                for _ in range(2):
                    resp = await t.send(req(srv.url))
                    assert await resp.read() == b"bye"
                    resp.close()
            finally:
                await t.aclose()
            assert srv.connections == 2

    run(main)


def test_server_closing_an_idle_connection_is_noticed(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(ok(b"one"))  # keep-alive by the headers, then dropped while idle
            await writer.drain()
            await asyncio.sleep(0.05)

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                assert await resp.read() == b"one"
                resp.close()
                await asyncio.sleep(0.2)  # the server has closed the pooled connection by now
                resp = await t.send(req(srv.url))
                assert await resp.read() == b"one"
                resp.close()
            finally:
                await t.aclose()
            assert srv.connections == 2

    run(main)


def test_unsolicited_bytes_drop_an_idle_connection(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(ok(b"x"))
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\n")  # nobody asked
                await writer.drain()

        async with RawServer(script) as srv:
            t = transport()
            try:
                for _ in range(2):
                    resp = await t.send(req(srv.url))
                    assert await resp.read() == b"x"
                    resp.close()
                    await asyncio.sleep(0.1)
            finally:
                await t.aclose()
            assert srv.connections == 2

    run(main)


def test_unread_stream_closed_early_is_not_reused(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await reader.read()  # until the client hangs up

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                async for chunk in resp.iter_chunks():
                    assert chunk == b"hello"
                    break
                resp.close()
                await asyncio.sleep(0.05)
                assert srv.open == 0  # the client closed it
            finally:
                await t.aclose()

    run(main)


def test_pool_is_bounded_and_concurrent_requests_all_answer(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                _, body = await read_request(reader)
                await asyncio.sleep(0.02)
                writer.write(ok(body))
                await writer.drain()

        async with RawServer(script) as srv:
            t = transport(pool_size=3)
            try:
                async def one(i: int) -> None:
                    resp = await t.send(req(srv.url, b"%d" % i))
                    assert await resp.read() == b"%d" % i
                    resp.close()

                await asyncio.gather(*(one(i) for i in range(30)))
            finally:
                await t.aclose()
            assert srv.max_open <= 3
            assert srv.connections == 3  # reused, not reopened

    run(main)


def test_many_concurrent_requests_against_aiohttp(run: Any) -> None:
    async def main() -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.Response(body=await request.read())

        app = web.Application()
        app.router.add_post("/e", echo)
        async with AppServer(app) as srv:
            t = transport(pool_size=8)
            try:
                async def one(i: int) -> None:
                    body = b"x" * (i * 97) + b"%d" % i
                    resp = await t.send(req(srv.url + "/e", body))
                    if i % 2:
                        assert await resp.read() == body
                    else:
                        assert await collect(resp.iter_chunks()) == body
                    resp.close()

                await asyncio.gather(*(one(i) for i in range(200)))
            finally:
                await t.aclose()
            assert len(set(srv.peers)) <= 8

    run(main)


def test_pool_wait_counts_as_connect_timeout(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await reader.read()

        async with RawServer(script) as srv:
            t = transport(pool_size=1)
            try:
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
            finally:
                await t.aclose()

    run(main)


def test_queued_requests_are_served_in_order_and_origins_share_the_bound(run: Any) -> None:
    async def main() -> None:
        async with RawServer(serve_each(ok(b"x"))) as one, RawServer(serve_each(ok(b"y"))) as two:
            t = transport(pool_size=1)
            try:
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
                resp = await t.send(req(two.url))
                assert await resp.read() == b"y"
                resp.close()
                assert t._pool is not None and t._pool.count == 1
            finally:
                await t.aclose()

    run(main)


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nhalf\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nha",
    ],
    ids=["content-length", "chunked-no-last", "chunked-mid-chunk"],
)
def test_truncated_body_is_a_read_error(run: Any, reply: bytes) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                with pytest.raises(ReadError):
                    await resp.read()
                resp.close()
                resp = await t.send(req(srv.url))
                with pytest.raises(ReadError):
                    await collect(resp.iter_chunks())
                resp.close()
            finally:
                await t.aclose()

    run(main)


def test_close_before_response_is_a_read_error(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200")

        async with RawServer(script) as srv:
            t = transport()
            try:
                with pytest.raises(ReadError):
                    await t.send(req(srv.url))
            finally:
                await t.aclose()

    run(main)


def test_reset_is_a_read_error(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nsome")
            await writer.drain()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                with pytest.raises(ReadError):
                    await resp.read()
                resp.close()
            finally:
                await t.aclose()

    run(main)


@pytest.mark.parametrize(
    "reply",
    [b"HELLO WORLD\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
     b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"],
    ids=["garbage", "bad-length", "upgrade"],
)
def test_malformed_response_is_a_read_error(run: Any, reply: bytes) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
            await reader.read()

        async with RawServer(script) as srv:
            t = transport()
            try:
                with pytest.raises(ReadError, match="malformed"):
                    resp = await t.send(req(srv.url))
                    await resp.read()
            finally:
                await t.aclose()

    run(main)


def test_refused_is_a_connect_error(run: Any) -> None:
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        t = transport()
        try:
            with pytest.raises(ConnectError):
                await t.send(req(f"http://127.0.0.1:{port}/x"))
            assert t._pool is not None and t._pool.count == 0
        finally:
            await t.aclose()

    run(main)


def test_host_names_resolve_and_every_address_is_tried(run: Any) -> None:
    async def main() -> None:
        # "localhost" may resolve to ::1 first; the server listens on 127.0.0.1 only.
        async with RawServer(serve_each(ok(b"hi"))) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url.replace("127.0.0.1", "localhost")))
                assert await resp.read() == b"hi"
                resp.close()
                with pytest.raises(ConnectError):
                    await t.send(req("http://no-such-host.invalid/x"))
            finally:
                await t.aclose()

    run(main)


def test_newline_in_a_header_is_refused(run: Any) -> None:
    async def main() -> None:
        t = transport()
        try:
            with pytest.raises(ValueError):
                await t.send(req("http://127.0.0.1:9/x", headers={"x-a": "1\r\nx-b: 2"}))
        finally:
            await t.aclose()

    run(main)


# -- timeouts ------------------------------------------------------------------------------------


def test_connect_timeout(run: Any) -> None:
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
        t = transport()
        try:
            with pytest.raises(ConnectTimeout):
                await t.send(req(f"http://127.0.0.1:{port}/x",
                                 timeouts=Timeouts(connect=0.3, first_byte=5, total=5, stream_idle=5)))
            assert t._pool is not None and t._pool.count == 0
        finally:
            await t.aclose()
            for f in fillers:
                f.close()
            lsock.close()

    run(main)


def test_first_byte_timeout_drops_the_connection(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await reader.read()  # never answers

        async with RawServer(script) as srv:
            t = transport()
            try:
                with pytest.raises(FirstByteTimeout):
                    await t.send(req(srv.url, timeouts=Timeouts(connect=1, first_byte=0.2, total=5, stream_idle=5)))
                await asyncio.sleep(0.05)
                assert srv.open == 0
                assert t._pool is not None and t._pool.count == 0
            finally:
                await t.aclose()

    run(main)


def test_stream_idle_timeout(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            for _ in range(3):  # within the idle gap, then silence
                await asyncio.sleep(0.1)
                writer.write(b"1\r\n.\r\n")
                await writer.drain()
            await reader.read()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url, timeouts=Timeouts(connect=1, first_byte=1, total=10, stream_idle=0.3)))
                got = []
                with pytest.raises(StreamIdleTimeout, match="idle"):
                    async for chunk in resp.iter_chunks():
                        got.append(chunk)
                assert b"".join(got) == b"first..."
                resp.close()
                await asyncio.sleep(0.05)
                assert srv.open == 0
            finally:
                await t.aclose()

    run(main)


def test_total_deadline_bounds_streams_and_reads(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            while True:  # steady trickle: never idle, never done
                await asyncio.sleep(0.05)
                writer.write(b"1\r\n.\r\n")
                await writer.drain()

        async with RawServer(script) as srv:
            t = transport()
            tight = Timeouts(connect=1, first_byte=1, total=0.4, stream_idle=5)
            try:
                loop = asyncio.get_running_loop()
                start = loop.time()
                resp = await t.send(req(srv.url, timeouts=tight))
                with pytest.raises(StreamIdleTimeout):
                    await collect(resp.iter_chunks())
                assert 0.35 < loop.time() - start < 1.5
                resp = await t.send(req(srv.url, timeouts=tight))
                with pytest.raises(StreamIdleTimeout, match="total"):
                    await resp.read()
            finally:
                await t.aclose()

    run(main)


def test_cancellation_closes_the_connection(run: Any) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, _ = await read_request(reader)
            if head.startswith(b"POST /v1/x "):  # the other path never gets an answer
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                await writer.drain()
            await reader.read()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                task = asyncio.ensure_future(resp.read())
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.05)
                assert srv.open == 0
                assert t._pool is not None and t._pool.count == 0

                sending = asyncio.ensure_future(t.send(req(srv.url.replace("/v1/x", "/v1/y"))))
                await asyncio.sleep(0.05)
                sending.cancel()  # while waiting for headers
                with pytest.raises(asyncio.CancelledError):
                    await sending
                await asyncio.sleep(0.05)
                assert t._pool.count == 0
            finally:
                await t.aclose()

    run(main)


def test_lagging_consumer_pauses_reading(run: Any) -> None:
    total = 8 * BUFFER_HIGH
    piece = b"z" * 16384

    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for _ in range(total // len(piece)):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()

        async with RawServer(script) as srv:
            t = transport()
            try:
                resp = await t.send(req(srv.url))
                await asyncio.sleep(0.3)  # the consumer lags
                conn = resp._conn  # type: ignore[attr-defined]
                assert conn.buffered <= BUFFER_HIGH + 512 * 1024  # bounded, not the whole body
                got = 0
                async for chunk in resp.iter_chunks():
                    got += len(chunk)
                assert got == total
                resp.close()
                resp = await t.send(req(srv.url))  # the connection is reusable afterwards
                assert len(await resp.read()) == total
                resp.close()
            finally:
                await t.aclose()
            assert srv.connections == 1

    run(main)


# -- TLS -----------------------------------------------------------------------------------------


def test_https_with_hostname_check(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
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

        app = web.Application()
        app.router.add_post("/h", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(cert, key)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx)
        await site.start()
        port = runner.addresses[0][1]
        t = transport()
        try:
            for _ in range(2):
                resp = await t.send(req(f"https://127.0.0.1:{port}/h"))
                assert await resp.read() == b"secure"
                resp.close()
            assert t._pool is not None and t._pool.count == 1
            # Plain HTTP spoken to a TLS port, and TLS to a plain one, fail as connect errors.
            with pytest.raises((ConnectError, ReadError)):
                await t.send(req(f"http://127.0.0.1:{port}/h"))
        finally:
            await t.aclose()
            await runner.cleanup()

        async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the ClientHello: answer it in plain HTTP
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

        async with RawServer(not_tls) as plain:
            t = transport()
            try:
                with pytest.raises(ConnectError):
                    await t.send(req(plain.url.replace("http://", "https://")))
            finally:
                await t.aclose()

    run(main)
