"""The front door's connections: aiohttp's low-level server with the limits it lacks.

Theory of operation, per connection (every timeout is a ``server.*`` key, read
from the config in force when the connection opens or the phase starts):

- idle: no request under way. aiohttp's own keep-alive timer closes the
  connection ``keepalive_timeout`` after its last response (or after it opened,
  if it never sends a byte).
- head: from the first byte of a request to the end of its headers, at most
  ``header_timeout``; then the server answers 408 and closes (a slowloris).
  One lazily re-armed timer per connection: a request arms nothing unless the
  connection's timer has fired since the previous one.
- body: the front door (``node.server``) reads the body within ``body_timeout``.
- response: when the client stops reading, the transport pauses writing; if it
  has not resumed ``stream_write_timeout`` later, the connection is aborted.
  aiohttp then cancels the request's task, which ends the stream, cancels its
  upstream call and releases its slots.
- cap: at most ``max_connections`` are open (lowered to fit the file-descriptor
  limit, ``node.limits``). One more closes the longest-open idle connection to
  make room, as nginx reuses idle keep-alive connections; when none is idle, the
  newcomer is answered 503 ``too_many_connections`` and closed.

Every close the server decides is counted in ``hapax_connections_closed_total``
and logged at most once per ``_LOG_EVERY`` seconds per reason. Malformed HTTP is
one warning line (no traceback) and ``hapax_http_protocol_errors_total``.

This reads a few private attributes of aiohttp's ``RequestHandler``
(``_request_in_progress``, ``_messages``, ``_waiter``) and ``Server._connections``;
they have been stable across 3.x, and tests/test_front_door.py covers each use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from hapax import Config, GatewayMetrics

from . import limits

log = logging.getLogger("hapax.node")

#: The Server header of every response: no product versions for scanners to match.
SERVER_HEADER: Final = "hapax"
#: Seconds a refused connection stays half-open, so its client reads the 503 cleanly.
_REFUSE_LINGER: Final = 1.0
#: Seconds between two log lines about the same kind of close; the counter counts them all.
_LOG_EVERY: Final = 10.0


def canned(status: int, reason: str, error_type: str, code: str, message: str) -> bytes:
    """A complete close-delimited error response, for moments with no request object to answer."""
    body = orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nserver: {SERVER_HEADER}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_REFUSED: Final = canned(
    503, "Service Unavailable", "api_error", "too_many_connections",
    "the server has too many open connections; retry shortly",
)
_HEAD_TIMEOUT: Final = canned(
    408, "Request Timeout", "timeout_error", "request_timeout",
    "the request line and headers did not arrive within server.header_timeout",
)


class _Throttle:
    """Whether to log now: at most once per period, with the count of lines held back."""

    __slots__ = ("_next", "_period", "held")

    def __init__(self, period: float) -> None:
        self._period = period
        self._next = 0.0
        self.held = 0

    def ready(self, now: float) -> bool:
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self._period
        return True


class Listener(web.Server):
    """``web.Server`` whose connections are ``GuardedHandler``s under one connection cap."""

    def __init__(
        self,
        handler: Any,
        *,
        config: Callable[[], Config],
        metrics: GatewayMetrics,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.config = config
        self.metrics = metrics
        self._cap_for: Config | None = None
        self._cap = 0
        self._throttles: dict[str, _Throttle] = {}
        metrics.registry.on_collect(self._collect)

    @property
    def cap(self) -> int:
        """``server.max_connections``, lowered to leave file descriptors for everything else."""
        cfg = self.config()
        if cfg is not self._cap_for:
            self._cap_for = cfg
            self._cap = limits.connection_cap(cfg)
        return self._cap

    def __call__(self) -> RequestHandler:
        srv = self.config().server
        return GuardedHandler(self, loop=self._loop, keepalive_timeout=srv.keepalive_timeout, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.cap:
            self._make_room(handler, transport)

    def _make_room(self, newcomer: RequestHandler, transport: asyncio.Transport) -> None:
        # Oldest first (dicts keep insertion order): the first idle one has idled longest, or
        # is a socket that never sent a request; in a flood of idle sockets it is found at once.
        for h in self._connections:
            if h is not newcomer and isinstance(h, GuardedHandler) and h.idle():
                h.force_close()
                self.closed("idle_evicted", "connection limit reached: closed the oldest idle connection")
                return
        if isinstance(newcomer, GuardedHandler):
            newcomer.refuse()
        else:
            newcomer.force_close()
        self.closed("refused", "connection limit reached and none idle: refused a connection with 503")

    def closed(self, reason: str, message: str) -> None:
        """Count a close the server decided, and log it unless one was logged lately."""
        self.metrics.connections_closed.inc(reason)
        t = self._throttles.get(reason)
        if t is None:
            t = self._throttles[reason] = _Throttle(_LOG_EVERY)
        if t.ready(self._loop.time()):
            fields = {"reason": reason, "connections": len(self._connections), "limit": self._cap}
            if t.held:
                fields["since_last_line"] = t.held
                t.held = 0
            log.warning(message, extra={"fields": fields})

    def protocol_error(self, remote: str | None, message: str) -> None:
        self.metrics.http_protocol_errors.inc()
        t = self._throttles.get("protocol")
        if t is None:
            t = self._throttles["protocol"] = _Throttle(_LOG_EVERY)
        if t.ready(self._loop.time()):
            fields: dict[str, Any] = {"remote": remote or "", "error": message[:200]}
            if t.held:
                fields["since_last_line"] = t.held
                t.held = 0
            log.warning("malformed HTTP request", extra={"fields": fields})

    def _collect(self) -> None:
        self.metrics.connections_open.set(to=len(self._connections))


class GuardedHandler(RequestHandler):
    """One client connection, with head and write timeouts (see the module docstring)."""

    __slots__ = ("_head_deadline", "_head_timer", "_in_head", "_listener", "_write_timer", "cut_reason")

    def __init__(self, manager: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = manager
        self._in_head = False
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        #: Set when the server cut the connection itself ("write_timeout"), so the request
        #: being answered is logged as cut by the server rather than as a client hang-up.
        self.cut_reason: str | None = None

    def idle(self) -> bool:
        """No request is being read or answered: closing now loses nothing but a socket."""
        return not (self._request_in_progress or self._messages or self._force_close or self._close)

    def refuse(self) -> None:
        """Answer 503 ``too_many_connections`` before any request, and close."""
        transport = self.transport
        if transport is None:
            return
        self._force_close = True  # aiohttp reads and answers nothing more here
        if self._waiter is not None:
            self._waiter.cancel()
        transport.write(_REFUSED)
        # Half-close, then close a moment later: closing at once, with the client's request
        # arriving, would reset the connection and lose the 503 before the client reads it.
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(_REFUSE_LINGER, transport.close)

    # -- head timeout ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._in_head and data:
            w = self._waiter
            # Waiting for a request (or between two, before aiohttp's reader task is back to
            # wait): these bytes start a request's head. Body bytes in the instant between a
            # head and its handler pass here too; ``request_started`` then clears the flag.
            if (w is not None and not w.done()) or (
                w is None and not self._request_in_progress and not self._messages
            ):
                self._in_head = True
                self._head_deadline = deadline = self._loop.time() + self._listener.config().server.header_timeout
                if self._head_timer is None:
                    self._head_timer = self._loop.call_at(deadline, self._on_head_timer)
        super().data_received(data)
        if self._in_head and self._messages:
            self._in_head = False  # the head is in

    def request_started(self) -> None:
        """The front door is handling a request: whatever arrived was its head."""
        self._in_head = False

    def _on_head_timer(self) -> None:
        self._head_timer = None
        if not self._in_head or self._force_close or self.transport is None or self._request_in_progress:
            return
        if self._loop.time() < self._head_deadline:
            # Armed for an earlier request's head: re-arm for this one's.
            self._head_timer = self._loop.call_at(self._head_deadline, self._on_head_timer)
            return
        self._in_head = False
        self.transport.write(_HEAD_TIMEOUT)
        self.force_close()
        self._listener.closed("header_timeout", "closed a connection whose request headers were too slow")

    # -- write timeout ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            timeout = self._listener.config().server.stream_write_timeout
            self._write_timer = self._loop.call_later(timeout, self._on_write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        self.cut_reason = "write_timeout"
        self._listener.closed("write_timeout", "closed a connection whose client stopped reading its response")
        # abort, not close: close would wait to flush what the client will never read.
        transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = None
        super().connection_lost(exc)

    # -- malformed requests ----------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            resp = super().handle_error(request, status, exc, message)
            resp.headers["server"] = SERVER_HEADER
            return resp
        # A bad request line or header: the client's fault, one line, no traceback.
        # One line: the parser's message carries a caret diagram over several.
        text = " ".join((message or str(exc)).split()) or "malformed request"
        self._listener.protocol_error(request.remote, text)
        body = orjson.dumps({"error": {
            "message": f"malformed HTTP request: {text}"[:300],
            "type": "invalid_request_error", "param": None, "code": "malformed_http",
        }})
        resp = web.Response(
            status=status, body=body, headers={"content-type": "application/json", "server": SERVER_HEADER}
        )
        resp.force_close()
        return resp
