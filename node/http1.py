"""A lean HTTP/1.1 keep-alive ``Transport`` on asyncio Protocols.

Why this exists: profiles put aiohttp's ``ClientSession`` request path (request
object, header multidicts, ``TimerContext``, ``asyncio.timeout`` per phase,
connector bookkeeping) at 25-30 % of the gateway's CPU per non-streaming call.
Upstream calls need little of it: POST/GET to a handful of fixed origins, no
redirects, cookies, proxies or compression. So this module writes requests
straight to a pooled ``asyncio.Protocol`` and parses responses in C.

The parser is ``httptools`` (llhttp, as used by uvicorn), not aiohttp's
``HttpResponseParser``. DESIGN §7 prefers aiohttp's own low levels, but that
parser is private API whose constructor has changed across 3.x releases, and
it hands each body to an aiohttp ``StreamReader`` with a ``CIMultiDict`` of
headers: the very per-response machinery we are trying to shed. httptools is
the same llhttp engine behind a small, stable, public callback API, so bodies
land directly in this protocol's buffer.

Semantics match ``node.upstream.AiohttpTransport``, which takes the shared parts
(keep-alive, deadlines, timeout errors, the response base) from here:

- ``connect`` bounds pool wait + TCP/TLS connect (``ConnectTimeout``);
  ``first_byte`` bounds everything until the response headers
  (``FirstByteTimeout``); ``read()`` is bounded by the ``total`` deadline and
  each ``iter_chunks()`` wait by ``stream_idle`` and ``total``
  (``StreamIdleTimeout``).
- refused/unresolvable/TLS failures are ``ConnectError``; a reset, an EOF
  before the body's end or a malformed response is ``ReadError``.
- ``close()`` pools a fully read, keep-alive connection and drops any other.

Response header names are lowercased (the callers look them up lowercase).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, cast
from urllib.parse import quote, urlsplit

import aiohappyeyeballs
import httptools

from hapax import (
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    ReadError,
    StreamIdleTimeout,
    TotalTimeout,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
)
from hapax.config import ProviderConfig, Timeouts

#: Keep idle upstream connections a while: providers are called constantly. Seconds;
#: node.upstream's aiohttp connector uses it too.
KEEPALIVE_SECONDS: Final = 60.0
#: Pause reading a stream whose consumer has this much unread; the consumer takes
#: all of it at once and reading resumes. Large enough that an SSE stream never
#: pauses while its consumer keeps up.
BUFFER_HIGH: Final = 256 * 1024
#: Stagger for trying a host's next address (RFC 8305; aiohttp's default too), so a
#: black-holed IPv6 route does not eat the whole connect timeout.
HAPPY_EYEBALLS_DELAY: Final = 0.25
#: How long a host's addresses are reused for new connections before they are looked up
#: again (aiohttp's ``ttl_dns_cache`` default; Envoy refreshes every 5 s). Seconds.
DNS_TTL: Final = 10.0
#: Parsed request targets kept per transport; URLs vary only by model name, so
#: this is a safety bound, not a working-set size.
_TARGET_CACHE_MAX: Final = 512
#: Request headers the transport writes itself; a caller's copy would duplicate or contradict them.
_OWN_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding"})

# Connection states.
_IDLE: Final = 0  # in the pool (or just connected): no response expected
_HEAD: Final = 1  # request written, waiting for final response headers
_BODY: Final = 2  # headers in, body arriving
_DONE: Final = 3  # final response complete


# -- shared with node.upstream ------------------------------------------------------------------
# Both transports must time out at the same moments and fail with the same errors, so the
# rules live here once. (Here rather than in node.upstream: that module imports this one.)


def deadlines(timeouts: Timeouts, *, now: float) -> tuple[float, float]:
    """Loop times by which a request sent at ``now`` must be complete, and must have its headers.

    The headers' deadline never passes the whole request's: ``first_byte`` only tightens ``total``.
    """
    deadline = now + timeouts.total
    return deadline, min(deadline, now + timeouts.first_byte)


def first_byte_timeout() -> FirstByteTimeout:
    return FirstByteTimeout("no response headers within the first-byte timeout")


def total_timeout() -> TotalTimeout:
    return TotalTimeout("total timeout reading the body")


def idle_timeout() -> StreamIdleTimeout:
    return StreamIdleTimeout("no data from upstream within the idle timeout")


class TimedResponse(UpstreamResponse):
    """A response whose body waits are bounded by the request's ``total`` and ``stream_idle``."""

    __slots__ = ("_deadline", "_idle", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], *, deadline: float, idle: float) -> None:
        self.status = status
        self.headers = headers
        self._deadline = deadline  # loop time by which the whole body must be in
        self._idle = idle  # seconds: the longest wait for the next chunk

    def _chunk_deadline(self, *, now: float) -> float:
        """When a wait for the next chunk started at ``now`` gives up: the idle gap, capped by the total."""
        return min(now + self._idle, self._deadline)


class _Target:
    """What a URL resolves to, computed once per URL: parsing URLs costs microseconds."""

    __slots__ = ("head", "host", "origin", "port", "tls")

    def __init__(self, method: str, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"unsupported upstream URL {url!r}")
        self.tls = scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.origin = (scheme, self.host, self.port)
        # Percent-encode what may not stand in a request line (as yarl would for aiohttp);
        # existing escapes are kept, and urlsplit has already dropped tabs and newlines.
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if self.tls else 80):
            host += f":{parts.port}"
        line = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\naccept-encoding: identity\r\n"
        if line.count("\n") != 3 or line.count("\r") != 3 or method.count(" "):
            raise ValueError("newline or space in upstream method or host")
        #: The static start of every request to this URL, encoded once.
        self.head = line.encode("utf-8")


class _Conn(asyncio.Protocol):
    """One upstream connection; also the httptools callback target (one object, fewer hops)."""

    def __init__(self, pool: _Pool, origin: tuple[str, str, int]) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = pool.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.closed = False
        #: Set when the connection must not carry another request.
        self.spent = False
        self.idle_since = 0.0
        self._status = 0
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: dict[str, str] = {}
        self._until_eof = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self._paused = False
        self.read_all = False
        self.exc: TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One lazily re-armed timer per connection: it may fire early (then re-arms for
        # the current wait's deadline) but never late, so most waits arm nothing.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._wait_deadline = 0.0
        self._on_timeout: Callable[[], TransportError] = first_byte_timeout

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def attach(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self._transport = cast(asyncio.Transport, transport)
        if self.closed:
            self._transport.abort()  # aborted (timeout, cancellation) while connecting

    def data_received(self, data: bytes) -> None:
        if self.state == _IDLE or self.state == _DONE:
            # Bytes nobody asked for: the stream is out of step, never reuse it.
            self.spent = True
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ReadError("malformed response: unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(ReadError(f"malformed response: {exc}"))

    def eof_received(self) -> bool | None:
        if self.state == _BODY and self._until_eof:
            # A body with neither length nor chunking ends where the server closes.
            self.spent = True
            self.state = _DONE
            self._wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.spent = True
        if self.state == _HEAD:
            self._set_exc(ReadError("upstream closed the connection before responding"))
        elif self.state == _BODY:
            if self._until_eof and exc is None:
                self.state = _DONE
            else:
                self._set_exc(ReadError("upstream closed the connection mid-body"))
        self._wake()
        self._forget()

    def pause_writing(self) -> None:
        # Request bodies are small and written once; nothing to throttle.
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            # A second response to one request: the stream is out of step; the callbacks
            # below ignore it and the connection is dropped after this response.
            self.spent = True
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.state != _HEAD:
            return
        status = self._parser.get_status_code()
        if status < 200:
            return  # 1xx is interim: its (empty) message completes and the real one follows
        headers: dict[str, str] = {}
        for name, value in self._raw_headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            prev = headers.get(key)
            headers[key] = text if prev is None else f"{prev}, {text}"
        self._raw_headers = []
        self._status = status
        self.headers = headers
        self._until_eof = (
            status not in (204, 304)
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )
        self.state = _BODY
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.state != _BODY:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BUFFER_HIGH and not self.read_all and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.state == _HEAD:
            return  # the end of a 1xx
        if self.state != _BODY:
            return
        self.state = _DONE
        if not self._parser.should_keep_alive():
            self.spent = True
        self._wake()

    # -- request side ------------------------------------------------------------------------

    def start(self, data: bytes) -> None:
        assert self._transport is not None
        self.state = _HEAD
        self._status = 0
        self.headers = {}
        self._until_eof = False
        self.read_all = False
        self._transport.write(data)

    @property
    def status(self) -> int:
        return self._status

    def take(self) -> bytes:
        """Everything buffered, resuming a paused socket."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def allow_full_buffer(self) -> None:
        """``read()`` wants the whole body anyway: never pause on its behalf."""
        self.read_all = True
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    async def wait(self, deadline: float, on_timeout: Callable[[], TransportError]) -> None:
        """Until the protocol has news (data, end, error), or raise ``on_timeout()`` when ``deadline`` passes."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._wait_deadline = deadline
        self._on_timeout = on_timeout
        timer = self._timer
        if timer is None or self._timer_when > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._loop.time() < self._wait_deadline:
            self._timer = self._loop.call_at(self._wait_deadline, self._on_timer)
            self._timer_when = self._wait_deadline
            return
        waiter.set_exception(self._on_timeout())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_exc(self, exc: TransportError) -> None:
        if self.exc is None:
            self.exc = exc

    def _fail(self, exc: TransportError) -> None:
        self._set_exc(exc)
        self._wake()
        self.abort()

    # -- lifecycle ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now; it leaves the pool's count at once."""
        self.spent = True
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self._forget()

    def _forget(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._pool.forget(self)

    def release(self) -> None:
        """After a response: back to the pool if it can carry another request, else closed."""
        if self.state == _DONE and not self.spent and not self.closed:
            # A complete body is off the socket even if unread, so the connection is clean.
            self.chunks.clear()
            self.buffered = 0
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            self.state = _IDLE
            self._pool.put(self)
        else:
            self.abort()

    def usable(self) -> bool:
        return not self.closed and not self.spent and self._transport is not None and not self._transport.is_closing()


_AddrInfo = list[tuple[int, int, int, str, tuple[object, ...]]]


class _Addresses:
    """A host's addresses, looked up once per ``DNS_TTL`` however many connections open meanwhile.

    Without it a burst of new streams on a cold pool made one ``getaddrinfo`` per
    connection, and the resolver runs in a thread pool of four (libuv's, or the
    loop's executor): 2,000 lookups of 20 ms each queue for ten seconds. Lookups of
    one host in flight together share one; a failed lookup is not kept, and an
    address that refuses a connection is looked up again next time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float = DNS_TTL) -> None:
        self.loop = loop
        self.ttl = ttl
        self._known: dict[tuple[str, int], tuple[float, _AddrInfo]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Task[_AddrInfo]] = {}
        #: ``getaddrinfo`` calls made (tests).
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> _AddrInfo:
        key = (host, port)
        known = self._known.get(key)
        if known is not None and self.loop.time() - known[0] < self.ttl:
            return known[1]
        task = self._lookups.get(key)
        if task is None:
            task = self._lookups[key] = self.loop.create_task(self._lookup(key))
            task.add_done_callback(_retrieved)  # every waiter may have given up before it failed
        # Shielded: one caller giving up (its connect timeout) must not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _lookup(self, key: tuple[str, int]) -> _AddrInfo:
        self.lookups += 1
        try:
            infos = cast(_AddrInfo, await self.loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM))
        finally:
            del self._lookups[key]
        if infos:
            if len(self._known) >= _TARGET_CACHE_MAX:
                self._known.clear()
            self._known[key] = (self.loop.time(), infos)
        return infos

    def forget(self, host: str, port: int) -> None:
        self._known.pop((host, port), None)


def _retrieved(task: asyncio.Task[_AddrInfo]) -> None:
    if not task.cancelled():
        task.exception()


class _Pool:
    """Keep-alive connections of one transport: at most ``limit`` open, idle ones reused LIFO.

    LIFO keeps the hottest connections busy and lets the rest age out, so the
    pool shrinks back after a burst.
    """

    def __init__(self, limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.count = 0
        self.idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self.conns: set[_Conn] = set()
        #: Requests queued for a connection, first come first served: a released
        #: connection is handed to the oldest directly, so new arrivals cannot starve it.
        self._waiters: deque[tuple[tuple[str, str, int], asyncio.Future[_Conn | None]]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self.addresses = _Addresses(self.loop)
        self.closed = False

    def pop_idle(self, origin: tuple[str, str, int]) -> _Conn | None:
        idle = self.idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable() and self.loop.time() - conn.idle_since < KEEPALIVE_SECONDS:
                return conn
            conn.abort()
        return None

    async def acquire(self, target: _Target, timeout: float) -> _Conn:
        while True:
            conn = self.pop_idle(target.origin)
            if conn is not None:
                return conn
            if self.closed:
                raise ConnectError("transport is closed")
            if self.count < self.limit or self._evict_other(target.origin):
                return await self._connect(target, timeout)
            waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
            self._waiters.append((target.origin, waiter))
            try:
                conn = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Served, then cancelled before running: pass what we got to the next in line.
                    handed = waiter.result()
                    if handed is not None:
                        self.put(handed)
                    else:
                        self._wake_one()
                raise
            if conn is not None and conn.usable():
                return conn
            # Else a slot was freed (or the handed connection died meanwhile): try again.

    def _evict_other(self, origin: tuple[str, str, int]) -> bool:
        for other, idle in self.idle.items():
            if other != origin and idle:
                idle.pop(0).abort()
                return True
        return False

    async def _connect(self, target: _Target, timeout: float) -> _Conn:
        self.count += 1
        conn = _Conn(self, target.origin)
        self.conns.add(conn)
        try:
            infos = await self.addresses.resolve(target.host, target.port)
            if not infos:
                raise ConnectError(f"cannot resolve {target.host}")
            tls: dict[str, Any] = {}
            if target.tls:
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                tls = {"ssl": self._ssl, "server_hostname": target.host, "ssl_handshake_timeout": timeout}
            try:
                family, _, proto, _, address = infos[0]
                scoped = len(address) > 3 and bool(address[3])
                if len(infos) == 1 and not scoped:
                    # One address, nothing to race: the loop's own connect (libuv's on uvloop)
                    # costs half the CPU of a socket connected here and handed over, which
                    # a cold pool pays once per stream of a burst. (An IPv6 address with a
                    # scope id takes the other path: a host string would lose it.)
                    transport, _ = await self.loop.create_connection(
                        lambda: conn, str(address[0]), int(cast(int, address[1])),
                        family=family, proto=proto, **tls,
                    )
                else:
                    # Race them ourselves (aiohappyeyeballs, which aiohttp uses too):
                    # uvloop's create_connection tries them one by one with no stagger.
                    sock = await aiohappyeyeballs.start_connection(
                        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=self.loop
                    )
                    transport, _ = await self.loop.create_connection(lambda: conn, sock=sock, **tls)
            except OSError:
                self.addresses.forget(target.host, target.port)  # the host may have moved
                raise
        except BaseException:
            conn.abort()
            raise
        # uvloop may return before calling connection_made; the protocol needs its transport now.
        conn.attach(transport)
        if self.closed:
            conn.abort()
            raise ConnectError("transport is closed")
        return conn

    def put(self, conn: _Conn) -> None:
        conn.idle_since = self.loop.time()
        while self._waiters:
            origin, waiter = self._waiters.popleft()
            if waiter.done():
                continue  # cancelled while queued
            if origin == conn.origin:
                waiter.set_result(conn)
                return
            # It wants another origin: pool this one and let it retry, evicting this idle one.
            waiter.set_result(None)
            break
        self.idle.setdefault(conn.origin, []).append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    def forget(self, conn: _Conn) -> None:
        """``conn`` is closed: free its slot (called exactly once per connection)."""
        self.count -= 1
        self.conns.discard(conn)
        idle = self.idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        """A slot was freed: the oldest waiter may open a connection."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        # Close connections idle past the keep-alive: the server may drop them any time
        # after its own timeout, and a request on a half-dead connection fails.
        self._sweeper = None
        cutoff = self.loop.time() - KEEPALIVE_SECONDS
        remaining = False
        for idle in list(self.idle.values()):
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                conn.abort()
            remaining = remaining or bool(idle)
        if remaining and not self.closed:
            self._sweeper = self.loop.call_later(KEEPALIVE_SECONDS / 2, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.conns):
            conn.abort()
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Http1Response(TimedResponse):
    __slots__ = ("_conn", "_released")

    def __init__(self, conn: _Conn, *, deadline: float, idle: float) -> None:
        super().__init__(conn.status, conn.headers, deadline=deadline, idle=idle)
        self._conn = conn
        self._released = False

    async def read(self) -> bytes:
        conn = self._conn
        if self._released:
            raise ReadError("response already closed")
        conn.allow_full_buffer()
        try:
            while conn.state != _DONE:
                if conn.exc is not None:
                    raise conn.exc
                await conn.wait(self._deadline, total_timeout)
        except BaseException:
            # Timeout, error or cancellation: the connection is mid-response, never reusable.
            self.close()
            raise
        return conn.take()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if self._released:
            raise ReadError("response already closed")
        loop = conn._loop
        try:
            while True:
                if conn.chunks:
                    # A slow reader keeps chunks buffered, so no wait (and its timer) would
                    # ever see the total deadline pass: check it here as well.
                    if loop.time() >= self._deadline:
                        raise total_timeout()
                    yield conn.take()
                    continue
                if conn.state == _DONE:
                    break
                if conn.exc is not None:
                    raise conn.exc
                await conn.wait(self._chunk_deadline(now=loop.time()), idle_timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._conn.release()


class Http1Transport(Transport):
    def __init__(self, config: ProviderConfig) -> None:
        self._limit = config.pool_size
        self._pool: _Pool | None = None
        self._targets: dict[tuple[str, str], _Target] = {}

    def _target(self, method: str, url: str) -> _Target:
        key = (method, url)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= _TARGET_CACHE_MAX:
                self._targets.clear()
            target = self._targets[key] = _Target(method, url)
        return target

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool(self._limit)
        loop = pool.loop
        t = request.timeouts
        now = loop.time()
        deadline, head_deadline = deadlines(t, now=now)
        target = self._target(request.method, request.url)
        data = _encode(target, request)

        conn = pool.pop_idle(target.origin)
        if conn is None:
            # Pool wait + connect: rare with keep-alive, so asyncio.timeout's cost is fine here.
            connect_deadline = min(now + t.connect, head_deadline)
            try:
                async with asyncio.timeout_at(connect_deadline):
                    conn = await pool.acquire(target, t.connect)
            except TimeoutError:
                if now + t.connect <= head_deadline:
                    raise ConnectTimeout("connect timed out") from None
                raise first_byte_timeout() from None
            except ssl.SSLError as exc:
                raise ConnectError(f"TLS handshake with {target.host} failed: {exc}") from exc
            except OSError as exc:
                raise ConnectError(f"cannot connect to {target.host}:{target.port}: {exc}") from exc

        conn.start(data)
        try:
            while conn.state == _HEAD:
                if conn.exc is not None:
                    raise conn.exc
                await conn.wait(head_deadline, first_byte_timeout)
        except BaseException:
            # Timed out, broken or cancelled (the client hung up): the connection is out of step.
            conn.abort()
            raise
        return Http1Response(conn, deadline=deadline, idle=t.stream_idle)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _encode(target: _Target, request: UpstreamRequest) -> bytes:
    """The request's bytes: the cached static head, the caller's headers, then the body."""
    items = [f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() not in _OWN_HEADERS]
    lines = "".join(items)
    n = len(items)
    if lines.count("\n") != n or lines.count("\r") != n:
        # As aiohttp: a newline in a header would let its value forge headers or requests.
        raise ValueError("newline or carriage return in upstream request headers")
    body = request.body
    if body is None:
        if request.method == "GET":
            return target.head + lines.encode("utf-8") + b"\r\n"
        body = b""
    return b"".join((target.head, lines.encode("utf-8"), b"content-length: %d\r\n\r\n" % len(body), body))
