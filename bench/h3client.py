"""A small HTTP/3 client on aioquic, for the tests and the h3 load generator.

``connect`` opens one QUIC connection; ``H3Client.request`` sends one request and
returns its whole response, ``H3Client.stream`` yields the body as it arrives.
Many requests may run at once on one connection (each its own stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived, StreamReset
from aioquic.tls import SessionTicket


@dataclass
class H3Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Set when the server reset the stream (its HTTP/3 error code).
    reset: int | None = None


class _Pending:
    def __init__(self) -> None:
        self.events: asyncio.Queue[H3Event | StreamReset] = asyncio.Queue()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self._pending: dict[int, _Pending] = {}
        self.authority = "localhost"
        #: Transports left behind by ``rebind``; closed with the connection.
        self._rebound: list[asyncio.DatagramTransport] = []
        #: The stream id of the server's last GOAWAY, and an event set when one arrives
        #: (aioquic's H3Connection reads GOAWAY but does not report it).
        self.goaway: int | None = None
        self.goaway_received = asyncio.Event()
        self._uni: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 3:
            self._control(event.stream_id, event.data)
        if isinstance(event, StreamReset):
            p = self._pending.get(event.stream_id)
            if p is not None:
                p.events.put_nowait(event)
        for ev in self.http.handle_event(event):
            sid = getattr(ev, "stream_id", None)
            p = self._pending.get(sid) if sid is not None else None
            if p is not None:
                p.events.put_nowait(ev)

    def _control(self, sid: int, data: bytes) -> None:
        """Follow the server's control stream (type 0x00) for GOAWAY frames."""
        buf = self._uni.setdefault(sid, bytearray())
        buf += data
        b = Buffer(data=bytes(buf))
        try:
            if b.pull_uint_var() != 0:
                self._uni[sid] = bytearray()  # not the control stream: stop collecting
                return
            while not b.eof():
                kind, length = b.pull_uint_var(), b.pull_uint_var()
                payload = b.pull_bytes(length)
                if kind == 0x07:
                    self.goaway = Buffer(data=payload).pull_uint_var()
                    self.goaway_received.set()
        except BufferReadError:
            pass  # the rest of a frame is still on its way

    def send(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> int:
        """Start a request with its whole body; its stream id."""
        if body:
            headers = [*headers, ("content-length", str(len(body)))]
        sid = self.open(method, path, headers, end=not body)
        if body:
            self.write(sid, body, end=True)
        return sid

    def open(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), *, end: bool = False) -> int:
        """Send a request's head; the body follows with ``write``. Its stream id."""
        sid = self._quic.get_next_available_stream_id()
        self._pending[sid] = _Pending()
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers),
        ]
        self.http.send_headers(sid, head, end_stream=end)
        self.transmit()
        return sid

    def write(self, sid: int, data: bytes, *, end: bool = False) -> None:
        self.http.send_data(sid, data, end_stream=end)
        self.transmit()

    async def events(
        self, sid: int, resp: H3Response | None = None
    ) -> AsyncIterator[tuple[H3Response, bytes | None]]:
        """(response so far, a body chunk) as they come; the chunk is None for the headers.
        A reset ends it with ``resp.reset`` set (pass ``resp`` to see it)."""
        p = self._pending[sid]
        resp = resp if resp is not None else H3Response()
        try:
            while True:
                ev = await p.events.get()
                if isinstance(ev, StreamReset):
                    resp.reset = ev.error_code
                    return
                if isinstance(ev, HeadersReceived):
                    for k, v in ev.headers:
                        if k == b":status":
                            resp.status = int(v)
                        else:
                            name = k.decode()
                            resp.headers[name] = (
                                v.decode() if name not in resp.headers else f"{resp.headers[name]}, {v.decode()}"
                            )
                    yield resp, None
                elif isinstance(ev, DataReceived) and ev.data:
                    yield resp, ev.data
                if getattr(ev, "stream_ended", False):
                    return
        finally:
            self._pending.pop(sid, None)

    async def response(self, sid: int) -> H3Response:
        """The whole response on stream ``sid``."""
        chunks: list[bytes] = []
        resp = H3Response()
        async for _head, chunk in self.events(sid, resp):
            if chunk is not None:
                chunks.append(chunk)
        resp.body = b"".join(chunks)
        return resp

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> H3Response:
        return await self.response(self.send(method, path, headers, body))

    def reset(self, sid: int) -> None:
        """Cancel a request (the client hangs up)."""
        with contextlib.suppress(Exception):
            self._quic.reset_stream(sid, 0x10C)  # H3_REQUEST_CANCELLED
            self._quic.stop_stream(sid, 0x10C)
        self.transmit()

    async def rebind(self) -> None:
        """Move the connection to a new local UDP port (a client changing networks)."""
        loop = asyncio.get_running_loop()
        old = self._transport
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0, 0, 0))
        await loop.create_datagram_endpoint(lambda: self, sock=sock)  # connection_made: the new transport
        if old is not None:
            self._rebound.append(old)
        self.transmit()

    @property
    def local_port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])


def client_configuration(
    *, cafile: str | None = None, verify: bool = True, ticket: SessionTicket | None = None,
    server_name: str = "localhost",
) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    if cafile is not None:
        cfg.load_verify_locations(cafile)
    if not verify:
        cfg.verify_mode = ssl.CERT_NONE
    cfg.session_ticket = ticket
    return cfg


@contextlib.asynccontextmanager
async def connect(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    *,
    on_ticket: Callable[[SessionTicket], None] | None = None,
    wait_connected: bool = True,
) -> AsyncIterator[H3Client]:
    async with quic_connect(
        host, port, configuration=configuration, create_protocol=H3Client,
        session_ticket_handler=on_ticket, wait_connected=wait_connected,
    ) as client:
        assert isinstance(client, H3Client)
        try:
            yield client
        finally:
            # aioquic closes the transport it opened; one a rebind made is ours to close.
            if client._rebound:
                client.close()
                await client.wait_closed()
                for t in (*client._rebound, client._transport):
                    if t is not None:
                        t.close()
