"""The HTTP/3 front door: aioquic on a UDP port, into the same pipeline as HTTP/1.1.

Theory of operation:

- One UDP endpoint (``Http3Door``, aioquic's ``QuicServer``) demultiplexes datagrams
  by connection id to one ``_Connection`` each (aioquic's sans-IO ``QuicConnection``
  under ``H3Connection``). Each request stream becomes a ``hapax.Request`` with
  ``protocol="h3"`` and is answered by ``Gateway.handle``, exactly as the HTTP/1.1
  door does (``node.server.FrontDoor``): the same checks (body size, body timeout),
  the same errors, the same response bytes; only the framing differs.
- One task per request, as aiohttp runs one per HTTP/1.1 request; a stream reset by
  the client or a connection that ends cancels it, which the pipeline records as
  499 and which closes a stream's upstream call.
- 0-RTT: a request stream whose headers arrive before the handshake completes came
  in early data, which an attacker may replay (``node.quic_tickets``). Safe methods
  (GET, HEAD, OPTIONS) are served at once; any other is answered 425 ``too_early``
  (``server.http3.early_data: reject``; RFC 8470, the client retries after the
  handshake) or waits for the handshake (``hold``). Nothing else about repeated
  requests is refused.
- Migration: aioquic validates a client's new address and moves the connection to
  it; the door counts each change of the peer address it sees.
- Draining (``Node.drain``): GOAWAY on every connection (the first stream id not
  served), no new connections; streams in flight finish within the grace, and those
  still open at its end get the same ``shutting_down`` error event as on HTTP/1.1.
- Certificates are read through ``node.certs.CertificateFiles`` and re-read (off
  the loop) when the files change or on SIGHUP; new connections use the new pair.

It reads a few private attributes of aioquic (``QuicServer._configuration``,
``QuicConnection._local_max_streams_bidi``, ``H3Connection._local_control_stream_id``
and ``_is_done``, ``QuicStream.sender``): aioquic has no public setter for the
server's configuration or ``MAX_STREAMS``, and no GOAWAY sender.
tests/test_http3*.py cover each use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, ProtocolNegotiated, QuicEvent, StreamReset
from multidict import CIMultiDict, MultiDict

from hapax import (
    ClientWriteTimeout,
    Config,
    Gateway,
    HapaxError,
    PayloadTooLarge,
    Request,
    RequestTimeout,
    ShuttingDown,
    TooEarly,
)
from hapax.config import Http3Config

from .certs import CertificateFiles
from .protocol import SERVER_HEADER
from .quic_steering import ENV_UDP_FD, steer_connection_ids
from .quic_tickets import TicketStore

log = logging.getLogger("hapax.node")

#: Methods safe to replay (RFC 9110 §9.2.1), so served from 0-RTT early data.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: Seconds to write a cut stream's closing events; a client that takes none is dropped.
_CUT_WRITE_TIMEOUT: Final = 1.0
#: Bytes queued unsent on one response stream before the writer waits for the client to
#: take some: bounds what a client that stops reading can make the node hold.
_SEND_HIGH: Final = 256 * 1024
#: Seconds between checks of a paused stream's queue (aioquic has no drain callback).
_SEND_POLL: Final = 0.01


def quic_configuration(h3: Http3Config, *, certs: CertificateFiles) -> QuicConfiguration:
    """The server's QUIC configuration; reads the certificate and key (call off the loop)."""
    cfg = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=False,
        idle_timeout=h3.idle_timeout,
        max_data=h3.max_data,
        max_stream_data=h3.max_stream_data,
        max_datagram_size=h3.max_datagram_size,
    )
    cfg.load_cert_chain(certs.cert_file, certs.key_file)
    return cfg


def alt_svc(h3: Http3Config, port: int) -> str | None:
    """The ``Alt-Svc`` value HTTP/1.1 responses carry, or None when it is off."""
    if not h3.enabled or h3.alt_svc_max_age == 0:
        return None
    return f'h3=":{h3.advertise_port or port}"; ma={h3.alt_svc_max_age}'


class _Stream:
    """One request stream: its head, its body as it arrives, and the task answering it."""

    __slots__ = ("body", "early", "ended", "head", "reject", "size", "task", "timer")

    def __init__(self, head: Request, *, early: bool) -> None:
        self.head = head
        self.body: list[bytes] = []
        self.size = 0
        self.ended = False
        self.early = early
        self.reject: HapaxError | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class _Connection(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 framing, request streams, 0-RTT policy, migrations."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, door: Http3Door) -> None:
        super().__init__(quic, stream_handler)
        self._door = door
        # No public setter: the value is sent in the transport parameters, which are not
        # written before the first datagram, so setting it here takes effect.
        quic._local_max_streams_bidi.value = door.h3.max_streams
        if door.steer_index is not None:
            steer_connection_ids(quic, door.steer_index)
        self._h3: H3Connection | None = None
        self._streams: dict[int, _Stream] = {}
        self._handshake = self._loop.create_future()
        self._peer: NetworkAddress | None = None
        #: Highest client-initiated request stream id seen, for GOAWAY.
        self._last_stream = -4
        self._goaway_id: int | None = None
        door.connections.add(self)

    # -- datagrams and QUIC events ----------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        super().datagram_received(data, addr)
        peer = self._quic.get_peer_address()
        if peer != self._peer:
            if self._peer is not None and self._handshake.done():
                self._door.gateway.metrics.http3_migrations.inc()
                log.info("HTTP/3 client migrated", extra={"fields": {"to": _host(peer)}})
            self._peer = peer

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self._h3 = H3Connection(self._quic)
        elif isinstance(event, HandshakeCompleted):
            self._door.gateway.metrics.http3_handshakes.inc("resumed" if event.session_resumed else "full")
            if not self._handshake.done():
                self._handshake.set_result(None)
        elif isinstance(event, StreamReset):
            s = self._streams.get(event.stream_id)
            # After our STOP_SENDING (``_refuse``) the client resets its sending half, as
            # RFC 9000 §3.5 asks: that is an answer to ours, not a cancel; the response goes on.
            if s is not None and s.reject is None:
                del self._streams[event.stream_id]
                self._drop(s)
        elif isinstance(event, ConnectionTerminated):
            self._terminated()
            return
        h3 = self._h3
        if h3 is None:
            return
        was_done = h3._is_done
        for ev in h3.handle_event(event):
            self._http_event(ev)
        if h3._is_done and not was_done:
            # aioquic closed the connection on an HTTP/3 protocol error (a malformed
            # request head, a frame out of place): RFC 9114 makes those connection errors.
            self._door.protocol_error(self._peer, "malformed HTTP/3 request")

    def _terminated(self) -> None:
        self._door.connections.discard(self)
        for s in self._streams.values():
            self._drop(s)
        self._streams.clear()
        if not self._handshake.done():
            self._handshake.cancel()

    def _drop(self, s: _Stream) -> None:
        if s.timer is not None:
            s.timer.cancel()
        if s.task is not None:
            s.task.cancel()

    # -- requests ---------------------------------------------------------------------------

    def _http_event(self, ev: H3Event) -> None:
        if isinstance(ev, HeadersReceived):
            self._headers(ev)
        elif isinstance(ev, DataReceived):
            s = self._streams.get(ev.stream_id)
            if s is None or (s.task is not None and s.reject is None and s.ended):
                return
            if ev.data and s.reject is None and not s.ended:
                s.size += len(ev.data)
                limit = self._door.config().server.max_body_bytes
                if s.size > limit:
                    self._refuse(ev.stream_id, s, PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"))
                    return
                s.body.append(ev.data)
            if ev.stream_ended and s.reject is None and not s.ended:
                s.ended = True
                self._dispatch(ev.stream_id, s)

    def _headers(self, ev: HeadersReceived) -> None:
        sid = ev.stream_id
        if sid in self._streams:
            return  # trailers: nothing reads them
        if self._goaway_id is not None and sid >= self._goaway_id:
            # After GOAWAY: not processed, so the client may safely retry it elsewhere.
            self._quic.reset_stream(sid, ErrorCode.H3_REQUEST_REJECTED)
            self.transmit()
            return
        self._last_stream = max(self._last_stream, sid)
        method = path = ""
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in ev.headers:
            if name.startswith(b":"):
                if name == b":method":
                    method = value.decode("latin-1")
                elif name == b":path":
                    path = value.decode("latin-1")
                elif name == b":authority":
                    headers.add("host", value.decode("latin-1"))
            else:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        raw_path, _, qs = path.partition("?")
        req = Request(
            method=method,
            path=unquote(raw_path),
            headers=headers,
            body=b"",
            remote=_host(self._peer),
            query=MultiDict(parse_qsl(qs, keep_blank_values=True)) if qs else {},
            protocol="h3",
        )
        s = self._streams[sid] = _Stream(req, early=not self._handshake.done())
        srv = self._door.config().server
        cl = headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > srv.max_body_bytes:
            self._refuse(sid, s, PayloadTooLarge(f"request body is {cl} bytes; the limit is {srv.max_body_bytes}"))
            return
        if ev.stream_ended:
            s.ended = True
            self._dispatch(sid, s)
        else:
            s.timer = self._loop.call_later(srv.body_timeout, self._body_timeout, sid, srv.body_timeout)

    def _body_timeout(self, sid: int, timeout: float) -> None:
        s = self._streams.get(sid)
        if s is None or s.ended or s.reject is not None:
            return
        s.timer = None
        self._door.closed("body_timeout")
        self._refuse(sid, s, RequestTimeout(
            f"the request body did not arrive within server.body_timeout ({timeout:g} s)"))

    def _refuse(self, sid: int, s: _Stream, exc: HapaxError) -> None:
        """Answer with ``exc`` now and ask the client to stop sending the rest of the body."""
        s.reject = exc
        s.body.clear()
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if not s.ended:
            # RFC 9114 §4.1: a complete response before the whole request, then STOP_SENDING
            # with H3_NO_ERROR: the client stops uploading without treating it as an error.
            with contextlib.suppress(Exception):
                self._quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
        self._start(sid, s)

    def _dispatch(self, sid: int, s: _Stream) -> None:
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        s.head.body = s.body[0] if len(s.body) == 1 else b"".join(s.body)
        s.body = []
        m = self._door.gateway.metrics
        if s.early:
            if s.head.method in SAFE_METHODS:
                m.http3_zero_rtt.inc("accepted")
            elif self._door.h3.early_data == "reject":
                m.http3_zero_rtt.inc("refused")
                s.reject = TooEarly("the request arrived in TLS early data (0-RTT); retry it after the handshake")
            else:
                m.http3_zero_rtt.inc("held")
                s.task = self._loop.create_task(self._held(sid, s))
                return
        self._start(sid, s)

    def _start(self, sid: int, s: _Stream) -> None:
        if s.task is None:
            s.task = self._loop.create_task(self._serve(sid, s))

    async def _held(self, sid: int, s: _Stream) -> None:
        await self._handshake  # cancelled with the connection if it never completes
        await self._serve(sid, s)

    async def _serve(self, sid: int, s: _Stream) -> None:
        door = self._door
        try:
            resp = await door.gateway.handle(s.head, reject=s.reject)
            resp.headers["server"] = SERVER_HEADER
            if door.worker is not None:
                resp.headers["x-hapax-worker"] = door.worker
            h3 = self._h3
            assert h3 is not None
            head = [(b":status", str(resp.status).encode())]
            head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
            if resp.stream is None:
                body = resp.body
                head.append((b"content-length", str(len(body)).encode()))
                if s.head.method == "HEAD" or not body:
                    h3.send_headers(sid, head, end_stream=True)
                else:
                    h3.send_headers(sid, head)
                    h3.send_data(sid, body, end_stream=True)
                # Once per loop pass: the responses and ACKs of one pass share datagrams.
                self._transmit_soon()
                return
            await self._stream(sid, head, resp.stream)
        except asyncio.CancelledError:
            raise  # the client reset the stream or the connection ended: nothing to write to
        except Exception:  # the connection broke under us: log, keep serving the others
            log.exception("HTTP/3 response failed", extra={"fields": {"stream": sid}})
            with contextlib.suppress(Exception):
                self._quic.reset_stream(sid, ErrorCode.H3_INTERNAL_ERROR)
                self.transmit()
        finally:
            self._streams.pop(sid, None)

    async def _stream(self, sid: int, head: list[tuple[bytes, bytes]], stream: AsyncIterator[bytes]) -> None:
        h3 = self._h3
        assert h3 is not None
        door = self._door
        task = asyncio.current_task()
        assert task is not None
        door.streams.add(task)
        cut: Callable[[HapaxError], bytes] | None = getattr(stream, "cut", None)
        try:
            h3.send_headers(sid, head)
            self._transmit_soon()
            async for chunk in stream:
                # Events the upstream delivered in one read come out without a loop pass
                # between them: deferring the send packs them into one datagram.
                h3.send_data(sid, chunk, end_stream=False)
                self._transmit_soon()
                if self._unsent(sid) > _SEND_HIGH and not await self._drained(sid):
                    # The client stopped reading (its flow-control window stays shut).
                    if cut is not None:
                        cut(ClientWriteTimeout(
                            "the client did not read its response within server.stream_write_timeout"))
                    door.closed("write_timeout")
                    self._quic.reset_stream(sid, ErrorCode.H3_REQUEST_CANCELLED)
                    self.transmit()
                    return
            h3.send_data(sid, b"", end_stream=True)
            self._transmit_soon()
        except asyncio.CancelledError:
            if not door.shutting_down or cut is None or sid not in self._streams:
                raise  # the client went away
            # Node.drain cancelled us at the end of the grace: say so to the client, then end.
            task.uncancel()
            tail = cut(ShuttingDown("the server is shutting down; retry on another node"))
            with contextlib.suppress(Exception):
                h3.send_data(sid, tail, end_stream=True)
                self.transmit()
                await self._drained(sid, to=0, timeout=_CUT_WRITE_TIMEOUT)
            door.closed("shutdown")
        finally:
            door.streams.discard(task)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def unacked(self) -> bool:
        """Whether any response bytes on this connection still wait for the client's ACK."""
        return any(self._unsent(sid) for sid in self._quic._streams if sid % 4 == 0)

    def _unsent(self, sid: int) -> int:
        """Bytes of the stream's response the client has not acknowledged yet."""
        qs = self._quic._streams.get(sid)
        if qs is None:
            return 0
        sender = qs.sender
        return int(sender._buffer_stop - sender._buffer_start)

    async def _drained(self, sid: int, *, to: int = _SEND_HIGH // 2, timeout: float | None = None) -> bool:
        """Whether the client took the stream's queue down to ``to`` bytes in time
        (``server.stream_write_timeout`` unless ``timeout``); polled: aioquic has no drain callback."""
        if timeout is None:
            timeout = self._door.config().server.stream_write_timeout
        deadline = self._loop.time() + timeout
        while sid in self._streams and self._unsent(sid) > to:
            if self._loop.time() >= deadline:
                return False
            await asyncio.sleep(_SEND_POLL)
        return True

    # -- shutdown ---------------------------------------------------------------------------

    def goaway(self) -> None:
        """HTTP/3 GOAWAY (RFC 9114 §5.2): streams from the next id on will not be served."""
        h3 = self._h3
        if self._goaway_id is not None or h3 is None or h3._local_control_stream_id is None:
            return
        self._goaway_id = self._last_stream + 4
        with contextlib.suppress(Exception):
            self._quic.send_stream_data(
                h3._local_control_stream_id, encode_frame(FrameType.GOAWAY, encode_uint_var(self._goaway_id))
            )
            self.transmit()

    def close_gracefully(self) -> None:
        # Responses whose last bytes wait for a deferred send (``_transmit_soon``) go first:
        # once closing, aioquic sends only the CONNECTION_CLOSE.
        self.transmit()
        self.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase="server shutting down")


def _host(addr: NetworkAddress | None) -> str:
    if addr is None:
        return ""
    host = str(addr[0])
    return host[7:] if host.startswith("::ffff:") else host


class _Server(QuicServer):
    """aioquic's endpoint, refusing new connections while the node drains."""

    def __init__(self, *, door: Http3Door, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._door = door

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self._door.shutting_down and len(self._door.connections) == 0:
            return
        if self._door.draining and not self._known(data):
            return  # a new connection while draining: dropped, the client tries elsewhere
        super().datagram_received(data, addr)

    def _known(self, data: bytes | str) -> bool:
        # Short-header packets carry only a destination id: any of ours is in _protocols.
        # Long headers (Initial, Handshake) of a known connection are too.
        from aioquic._buffer import Buffer
        from aioquic.quic.packet import pull_quic_header

        raw = data if isinstance(data, bytes) else data.encode()
        try:
            header = pull_quic_header(Buffer(data=raw), host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return False
        return header.destination_cid in self._protocols

    def set_configuration(self, configuration: QuicConfiguration) -> None:
        # New connections only: each connection keeps the configuration it started with.
        self._configuration = configuration


class Http3Door:
    """The UDP endpoint and its connections; ``Node`` starts, reloads and drains it."""

    def __init__(self, gateway: Gateway, *, worker: str | None = None, closed: Callable[[str, str], None]) -> None:
        self.gateway = gateway
        self.worker = worker
        self._closed = closed
        self.connections: set[_Connection] = set()
        self.streams: set[asyncio.Task[Any]] = set()
        self.tickets = TicketStore()
        self.draining = False
        self.shutting_down = False
        self.port = 0
        #: This worker's index in the connection ids it issues, when the supervisor steers
        #: datagrams by connection id (node.quic_steering); None: one process, or hashed.
        self.steer_index: int | None = None
        self._server: _Server | None = None
        self._certs: CertificateFiles | None = None
        self._h3_for: Http3Config | None = None
        self._reloading: asyncio.Task[None] | None = None
        gateway.metrics.registry.on_collect(self._collect)

    def config(self) -> Config:
        return self.gateway.runtime.config

    @property
    def h3(self) -> Http3Config:
        return self.gateway.runtime.config.server.http3

    async def start(self) -> None:
        srv = self.config().server
        h3 = srv.http3
        assert h3.certificate_file is not None and h3.key_file is not None
        certs = self._certs = CertificateFiles(h3.certificate_file, h3.key_file)
        stamp = certs.stamp()
        configuration = await asyncio.to_thread(quic_configuration, h3, certs=certs)
        certs.mark(stamp)
        self._h3_for = h3
        loop = asyncio.get_running_loop()
        host = h3.host or srv.host
        port = h3.port if h3.port is not None else srv.port
        tickets = self.tickets if h3.session_tickets else None
        # With --workers the supervisor's socket steers by connection id (node.quic_steering);
        # without one (a single process), SO_REUSEPORT lets a restarted node rebind at once.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        endpoint: dict[str, Any] = {"local_addr": (host, port), "family": family, "reuse_port": True}
        inherited = os.environ.get(ENV_UDP_FD)
        if inherited is not None and self.worker is not None:
            # The supervisor's socket for this worker: datagrams steered by connection id.
            endpoint = {"sock": socket.socket(fileno=int(inherited))}
            self.steer_index = int(self.worker)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Server(
                door=self,
                configuration=configuration,
                create_protocol=lambda quic, stream_handler=None: _Connection(quic, stream_handler, door=self),
                session_ticket_fetcher=tickets.pop if tickets is not None else None,
                session_ticket_handler=tickets.add if tickets is not None else None,
            ),
            **endpoint,
        )
        self._server = protocol
        self.port = transport.get_extra_info("sockname")[1]

    def alt_svc(self) -> str | None:
        """The ``Alt-Svc`` the HTTP/1.1 door sends now (the config's max-age, this port)."""
        return alt_svc(self.h3, self.port)

    @property
    def address(self) -> str:
        srv = self.config().server
        return f"{srv.http3.host or srv.host}:{self.port}"

    def reload(self, *, force: bool = False) -> None:
        """Re-read the certificate pair if its files changed (or ``force``), and the QUIC
        settings if the config changed; off the loop, new connections only."""
        if self._server is None or self._certs is None:
            return
        if self._reloading is not None and not self._reloading.done():
            return
        h3 = self.h3
        if not (force or (h3 is not self._h3_for and h3 != self._h3_for) or self._certs.changed()):
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(h3))

    async def _reload(self, h3: Http3Config) -> None:
        assert self._certs is not None and self._server is not None
        certs = self._certs
        if h3.certificate_file is not None and h3.key_file is not None and (
            (h3.certificate_file, h3.key_file) != (certs.cert_file, certs.key_file)
        ):
            certs = CertificateFiles(h3.certificate_file, h3.key_file)
        try:
            stamp = certs.stamp()
            configuration = await asyncio.to_thread(quic_configuration, h3, certs=certs)
        except Exception as exc:
            log.error("HTTP/3 certificate reload failed; keeping the last good pair",
                      extra={"fields": {"certificate_file": certs.cert_file, "error": str(exc)[:200]}})
            if self._certs is certs:
                with contextlib.suppress(OSError):
                    certs.mark(certs.stamp())  # not again until the files change again
            return
        certs.mark(stamp)
        self._certs = certs
        self._h3_for = h3
        self._server.set_configuration(configuration)
        self.tickets.clear()
        log.info("HTTP/3 certificate loaded", extra={"fields": {"certificate_file": certs.cert_file}})

    def protocol_error(self, peer: NetworkAddress | None, message: str) -> None:
        self.gateway.metrics.http_protocol_errors.inc()
        log.warning("malformed HTTP/3 request", extra={"fields": {"remote": _host(peer), "error": message}})

    def closed(self, reason: str) -> None:
        messages = {
            "body_timeout": "answered an HTTP/3 request whose body was too slow",
            "shutdown": "ended an HTTP/3 stream at the end of the shutdown grace",
            "write_timeout": "reset an HTTP/3 stream whose client stopped reading its response",
        }
        self._closed(reason, messages.get(reason, reason))

    def goaway(self) -> None:
        """Draining: GOAWAY on every connection, and no new connections."""
        self.draining = True
        for conn in list(self.connections):
            conn.goaway()

    def cut_streams(self) -> int:
        self.shutting_down = True
        for task in list(self.streams):
            task.cancel()
        return len(self.streams)

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    async def aclose(self) -> None:
        # The last responses' bytes acknowledged (or a bounded wait) before CONNECTION_CLOSE,
        # which would discard a lost packet's retransmission.
        deadline = asyncio.get_running_loop().time() + _CUT_WRITE_TIMEOUT
        while any(c.unacked() for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            for conn in list(self.connections):
                conn.transmit()
            await asyncio.sleep(_SEND_POLL)
        for conn in list(self.connections):
            conn.close_gracefully()
        if self._server is not None and self._server._transport is not None:
            # Let the CONNECTION_CLOSE frames leave before the socket closes.
            await asyncio.sleep(0)
            self._server._transport.close()
        if self._reloading is not None:
            self._reloading.cancel()

    def _collect(self) -> None:
        self.gateway.metrics.http3_connections_open.set(to=len(self.connections))
