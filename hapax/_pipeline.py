"""The request pipeline, shared by every front door.

Theory of operation: a front door builds a ``Request`` and awaits
``Gateway.handle``; it gets back a ``Response`` to write, whose body may be a
stream. ``handle`` never raises: every failure becomes an OpenAI-shaped (or,
on ``/v1/messages``, Anthropic-shaped) JSON error here and nowhere else.

For a model call the stages are: take the runtime in force (one config
snapshot, kept until the call settles, named by ``x-hapax-config-revision``) → parse and check
the body → resolve the public model to its deployments → pick the provider →
translate the operation if the provider does not take it → call → translate
the reply back → count tokens, time and status; log one access line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import orjson

from ._access_log import AccessSink, LoggingAccessSink
from ._cors import add_cors
from ._errors import (
    HapaxError,
    InternalError,
    InvalidField,
    MethodNotAllowed,
    ModelNotFound,
    RouteNotFound,
    UnsupportedMediaType,
    UpstreamError,
)
from ._exchange import Exchange
from ._http import Request, Response
from ._metrics import Exposition, GatewayMetrics, Snapshot
from ._routes import BuiltinRoutes, _route_name
from ._sse import SSEEvent
from .access import AccessControl, AccessGrant, Principal
from .api import StreamTranslator, error_response, read_json_body, rename, stream_error, validate
from .config import Config, ConfigSnapshot, Secrets, read_api_key_files
from .providers import JsonReply, Operation, StreamReply
from .routing import Dispatcher, Runtime, TransportFactory

log = logging.getLogger("hapax.gateway")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_JSON = "application/json"
#: With logging.log_bodies, bodies are logged up to this size: enough to debug, bounded per line.
_LOGGED_BODY_BYTES = 16 * 1024
#: Larger bodies are never merged: their key (canonical JSON, hashed) would cost tens of
#: milliseconds of loop time, and identical concurrent megabyte prompts are rare.
_DEDUP_MAX_BYTES = 256 * 1024
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}

_OPS = {
    "/v1/chat/completions": (Operation.CHAT, "chat_completions"),
    "/v1/completions": (Operation.COMPLETIONS, "completions"),
    "/v1/embeddings": (Operation.EMBEDDINGS, "embeddings"),
    "/v1/messages": (Operation.MESSAGES, "messages"),
}


_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    # A forked worker must not repeat its parent's ids.
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = "req_" + os.urandom(6).hex()
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """Unique per process (random prefix) and across its life (counter); cheap on the hot path."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class Gateway(BuiltinRoutes):
    def __init__(
        self,
        config: Config | ConfigSnapshot,
        *,
        transport_factory: TransportFactory,
        metrics: GatewayMetrics | None = None,
        access: AccessControl | None = None,
        dispatcher: Dispatcher | None = None,
        access_sink: AccessSink | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        """``secrets``: the keys of providers' ``api_key_file``s, read by the caller off the loop
        (read here, blocking, when not given)."""
        snapshot = config if isinstance(config, ConfigSnapshot) else ConfigSnapshot(config, 1, "embedded")
        config = snapshot.config
        self.secrets: Secrets = secrets if secrets is not None else read_api_key_files(config)[0]
        self.access_sink: AccessSink = access_sink or LoggingAccessSink()
        self.metrics = metrics or GatewayMetrics()
        #: ``GET /metrics``; the node replaces it to say which worker of how many this is.
        self.exposition = Exposition(self.metrics)
        #: Set by the node when it runs several workers: their snapshots, for the node's totals.
        self.metrics_peers: Callable[[], Awaitable[Sequence[Snapshot]]] | None = None
        self.access = access or AccessControl(config)
        self.access.attach(self.metrics)
        self.dispatcher = dispatcher or Dispatcher(metrics=self.metrics)
        self._transport_factory = transport_factory
        self.runtime = Runtime(snapshot, generation=1, transport_factory=transport_factory, secrets=self.secrets)
        self._bind_metrics(config)
        # Deployments known now, not at the first call: their series exist from start-up.
        self.dispatcher.sync(self.runtime)
        self.draining = False
        self.started_at = int(time.time())
        self.in_flight = 0

    # -- config ------------------------------------------------------------------------

    def apply(self, update: Config | ConfigSnapshot, *, secrets: Secrets | None = None) -> Runtime:
        """Swap in a validated config; requests in flight keep the one they started on.

        A bare ``Config`` (tests, code) becomes the next revision of the current source.
        ``secrets`` as for the constructor (without, files are read here, keeping old keys).
        """
        old = self.runtime
        snapshot = update if isinstance(update, ConfigSnapshot) else ConfigSnapshot(
            update, old.revision + 1, old.snapshot.source)
        config = snapshot.config
        if secrets is None:
            secrets = read_api_key_files(config, previous=self.secrets)[0]
        self.secrets = secrets
        new = Runtime(
            snapshot,
            generation=old.generation + 1,
            transport_factory=self._transport_factory,
            previous=old,
            secrets=secrets,
        )
        self.runtime = new
        old.retire(new)
        self.access.apply(config)
        self._bind_metrics(config)
        self.dispatcher.sync(new)
        return new

    def rebuild_providers(self, secrets: Secrets) -> Runtime:
        """The same config with every provider built anew: credential files and CA bundles
        read again (a reload). Requests in flight finish on the providers they started on."""
        old = self.runtime
        self.secrets = secrets
        new = Runtime(old.snapshot, generation=old.generation + 1, transport_factory=self._transport_factory,
                      secrets=secrets, fresh=True)
        self.runtime = new
        old.retire(new)
        self.metrics.config_info.set(to=new.generation)
        self.dispatcher.sync(new)
        return new

    def _bind_metrics(self, config: Config) -> None:
        names = [n for m in config.models for n in (m.name, *m.aliases)]
        served = {(m.name, d.provider) for m in config.models for d in m.deployments}
        self.metrics.bind_config(names, config.providers, served)
        self.metrics.config_info.set(to=self.runtime.generation)
        self.metrics.config_revision.set(to=self.runtime.revision)

    def start(self) -> None:
        """Start background work (health probes); call once the event loop runs."""
        self.dispatcher.start(lambda: self.runtime)

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
        await self.runtime.aclose()
        await self.access.aclose()

    # -- entry point -------------------------------------------------------------------

    async def handle(self, req: Request, *, reject: HapaxError | None = None) -> Response:
        """Answer ``req``; with ``reject``, answer with that error (the front door found it)."""
        rid = req.headers.get("x-request-id", "")
        if not _SANE_REQUEST_ID.match(rid):
            rid = new_request_id()
        op_route = _OPS.get(req.path)
        route = op_route[1] if op_route else _route_name(req.path)
        ex = Exchange(rid, route, req.method, req.path, req.remote, protocol=req.protocol)
        ex.anthropic = req.path == "/v1/messages"
        # The request's snapshot: everything below, settlement included, reads this one.
        rt = self.runtime
        cors = rt.config.server.cors
        self.in_flight += 1
        self.metrics.in_flight.inc()
        streaming = False
        try:
            if reject is not None:
                raise reject
            if req.method == "OPTIONS" and cors.enabled:
                resp = Response(204, {})
            elif op_route is not None:
                if req.method != "POST":
                    raise MethodNotAllowed(f"{req.path} accepts POST only")
                resp = await self._model_call(req, ex, op_route[0], rt)
            elif req.path == "/metrics" and req.method in ("GET", "HEAD"):
                resp = await self._metrics_page(req)
            elif req.path.startswith("/admin/"):
                admin = await self.access.handle_admin(req, ex)
                if admin is None:
                    raise RouteNotFound(f"no route for {req.method} {req.path}")
                resp = admin
            elif req.path == "/v1/me" and req.method in ("GET", "HEAD"):
                resp = await self.access.me(req, ex)  # reads the shared state: awaited
            else:
                resp = await self._builtin(req, ex)
            streaming = resp.stream is not None
        except HapaxError as exc:
            resp = error_response(ex, exc)
        except asyncio.CancelledError:
            # The client hung up (the front door cancels us): count it, then let it unwind.
            ex.status = 499
            self._record(ex, time.perf_counter() - ex.started)
            raise
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("unhandled error", extra={"request_id": rid, "path": req.path})
            resp = error_response(ex, InternalError(f"internal error: {type(exc).__name__}"))
        finally:
            if not streaming:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        resp.headers["x-request-id"] = rid
        resp.headers["x-hapax-config-revision"] = rt.revision_header
        if cors.enabled:
            add_cors(rt.config, req, resp)
        if rt.config.logging.log_bodies and ex.model:
            ex.request_body = req.body[:_LOGGED_BODY_BYTES]
            if not streaming:
                ex.response_body = resp.body[:_LOGGED_BODY_BYTES]
        if not streaming:
            ex.status = resp.status
            if ex.cost_usd is not None:
                resp.headers["x-hapax-cost-usd"] = f"{ex.cost_usd:.8f}"
            total = time.perf_counter() - ex.started
            resp.headers["server-timing"] = (
                f"gateway;dur={(total - ex.upstream_seconds) * 1000:.3f}, "
                f"upstream;dur={ex.upstream_seconds * 1000:.3f}"
            )
            self._record(ex, total)
        return resp

    async def precheck(self, req: Request) -> HapaxError | None:
        """The error a request gets for its head alone, before its body is sent, if any.

        For ``Expect: 100-continue``: a client waits for a 100 before uploading its body,
        so a call that would be refused anyway (wrong route, method, content type or
        credential) is refused before the upload, not after.
        """
        op_route = _OPS.get(req.path)
        if op_route is None:
            return None
        if req.method != "POST":
            return MethodNotAllowed(f"{req.path} accepts POST only")
        ctype = req.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != _JSON:
            return UnsupportedMediaType(f"content-type must be application/json, got {ctype or 'none'!r}")
        try:
            await self.access.authenticate(req, Exchange("", op_route[1], req.method, req.path, req.remote))
        except HapaxError as exc:
            return exc
        return None

    # -- model calls -------------------------------------------------------------------

    async def _model_call(self, req: Request, ex: Exchange, op: Operation, rt: Runtime) -> Response:
        ctype = req.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != _JSON:
            raise UnsupportedMediaType(
                f"content-type must be application/json, got {ctype or 'none'!r}"
            )
        principal = await self.access.authenticate(req, ex)
        ex.principal = principal.id
        if principal.is_key:
            ex.key_name = principal.name
        ex.priority = _priority(req.headers.get("x-hapax-priority"), principal)
        ex.dedup = req.headers.get("x-hapax-dedup", "").lower() != "off" and len(req.body) <= _DEDUP_MAX_BYTES
        ex.client_headers = req.headers
        body = await read_json_body(req.body)
        validate(op, body)
        public = body["model"]
        model = rt.models.get(public)
        if model is None:
            raise ModelNotFound(
                f"the model '{public}' does not exist or you do not have access to it",
                param="model",
            )
        ex.model = model.name
        ex.stream = bool(body.get("stream"))
        # Asked before admission is awaited, so the shared dedup's question and the reservation
        # leave in one write to Redis; ended below whatever happens (a no-op once send used it).
        claim = self.dispatcher.claim(rt, model, op, body, ex)
        try:
            admission = await self.access.admit(principal, model, body, ex, config=rt.config)
        except BaseException:
            self.dispatcher.unclaim(claim)
            raise
        rt.acquire()
        settled = False
        try:
            try:
                d = await self.dispatcher.send(rt, model, op, body, ex)
            finally:
                self.dispatcher.unclaim(claim)
            headers = {
                "x-hapax-provider": d.deployment.provider,
                "x-hapax-upstream-model": d.deployment.model,
                "x-hapax-attempts": str(ex.attempts),
                **d.headers,
                **admission.headers,
            }
            reply, translation = d.reply, d.translation
            ex.usage = reply.usage
            # The client hears back the name it asked for (an alias included), unless the model
            # is configured to pass the upstream's through; the header always has the upstream's.
            name = orjson.dumps(public) if model.response_model == "public" else None
            if isinstance(reply, JsonReply):
                if translation is not None:
                    doc = translation.response(reply.body, reply.usage)
                    if name is not None:
                        doc["model"] = public
                    out = orjson.dumps(doc)
                elif reply.raw is not None:
                    out = reply.raw
                    upstream_name = reply.body.get("model")
                    if name is not None and isinstance(upstream_name, str):
                        out = rename(out, name, expect=upstream_name)
                elif name is not None and "model" in reply.body:
                    out = orjson.dumps({**reply.body, "model": public})  # a copy: dedup shares the reply
                else:
                    out = orjson.dumps(reply.body)
                headers["content-type"] = _JSON
                return Response(200, headers, out)
            translator = translation.stream(d.deployment.model, body) if translation else None
            headers.update(_SSE_HEADERS)
            settled = True  # the stream settles and releases when it ends
            stream = _ResponseStream(self, rt, reply, translator, ex, d.started, admission, name)
            return Response(200, headers, stream=stream)
        finally:
            if not settled:
                rt.release()
                await self.access.settle(admission, ex.usage, ex)


class _ResponseStream:
    """The body of a streamed response: the client's events, one write per upstream read.

    Whatever way the stream ends (done, upstream error, client gone, or closed by
    the front door before it ever started), ``_finish`` runs exactly once: the
    upstream is released, usage is settled, and the request is counted and logged.
    A plain async generator could not promise that: closing one that never
    started skips its ``finally``.
    """

    def __init__(
        self,
        gateway: Gateway,
        rt: Runtime,
        reply: StreamReply,
        translator: StreamTranslator | None,
        ex: Exchange,
        t0: float,
        admission: AccessGrant,
        name: bytes | None = None,
    ) -> None:
        self._gw = gateway
        #: The JSON-encoded model name events should carry; None leaves them as they come.
        self._name = name
        self._rt = rt
        self._reply = reply
        self._translator = translator
        self._ex = ex
        self._t0 = t0
        self._admission = admission
        self._body = self._events()
        self._finished = False
        #: Why the server itself ended the stream early (shutdown, a client not reading).
        self._cut: HapaxError | None = None
        ex.status = 200

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        # The generator itself, so each event is one generator step, not a step and a wrapper.
        return self._body

    async def __anext__(self) -> bytes:
        return await anext(self._body)

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            await self._finish(hung_up=True)

    def cut(self, exc: HapaxError) -> bytes:
        """The server ends this stream early because of ``exc``: the events that say so.

        An error event, then (OpenAI format) the ``[DONE]`` terminator, so a client sees
        why its stream ended; the exchange is logged with ``exc``'s status and code, not
        as a client hang-up. The front door writes the events if the client can still
        take them, then closes the stream as usual.
        """
        self._cut = exc
        self._ex.error = exc
        tail = stream_error(self._ex, exc)
        return tail if self._ex.anthropic else tail + b"data: [DONE]\n\n"

    def _encoded(self, batch: list[SSEEvent]) -> bytes:
        """One upstream read's events as the client's bytes."""
        translator = self._translator
        if translator is not None:
            batch = [e for ev in batch for e in translator.feed(ev)]
        return self._frames(batch)

    def _frames(self, batch: list[SSEEvent]) -> bytes:
        """Events in the client's format, model renamed: one join, no bytes object per event."""
        name = self._name
        parts: list[bytes] = []
        if self._ex.anthropic:
            for ev in batch:
                data = ev.data
                if name is not None and ev.event == "message_start":
                    data = rename(data, name)
                if ev.event is not None:
                    parts += (b"event: ", ev.event.encode(), b"\n")
                parts += (b"data: ", data, b"\n\n")
        elif name is None:
            for ev in batch:
                parts += (b"data: ", ev.data, b"\n\n")
        else:
            for ev in batch:
                parts += (b"data: ", rename(ev.data, name), b"\n\n")
        return b"".join(parts)

    async def _events(self) -> AsyncGenerator[bytes, None]:
        ex, reply = self._ex, self._reply
        anthropic = ex.anthropic
        try:
            first, reply.first = reply.first, None
            if first is not None:
                out = self._encoded(first)
                if out:
                    ex.ttft = time.perf_counter() - ex.started
                    yield out
            # The upstream's events directly, no wrapper in between: one step per read.
            events = reply.events
            while True:
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    break
                except UpstreamError as exc:
                    reply.failed(exc)  # the upstream failed, not our translation of it
                    raise
                out = self._encoded(batch)
                if out:
                    if ex.ttft is None:
                        ex.ttft = time.perf_counter() - ex.started
                    yield out
            tail = b""
            if self._translator is not None:
                last = self._translator.finish(reply.usage)
                if last:
                    tail = self._frames(last)
            if not anthropic:
                tail += b"data: [DONE]\n\n"
            if tail:
                yield tail
        except HapaxError as exc:
            ex.error = exc
            yield stream_error(ex, exc)
        except Exception as exc:
            log.exception("unhandled error in stream", extra={"request_id": ex.request_id})
            ex.error = InternalError(f"internal error: {type(exc).__name__}")
            yield stream_error(ex, ex.error)
        await self._finish(hung_up=False)

    async def _finish(self, *, hung_up: bool) -> None:
        if self._finished:
            return
        self._finished = True
        ex, gw = self._ex, self._gw
        if self._cut is not None:
            ex.status = self._cut.status
        elif hung_up:
            ex.status = 499  # client closed request (nginx's code): it left before the end
        ex.upstream_seconds = time.perf_counter() - self._t0
        try:
            self._reply.close()
        finally:
            self._rt.release()
            # Committed here; awaited last, so a cancelled close still counts and logs the call.
            settled = gw.access.settle(self._admission, ex.usage, ex)
            gw.in_flight -= 1
            gw.metrics.in_flight.dec()
            gw._record(ex, time.perf_counter() - ex.started)
        await settled


def _priority(header: str | None, principal: Principal) -> int:
    """The caller's asked-for priority, never more urgent than their key allows."""
    if header is None:
        return principal.default_priority
    try:
        asked = int(header)
    except ValueError:
        raise InvalidField("x-hapax-priority must be an integer, 0 most urgent", param="x-hapax-priority") from None
    return max(asked, principal.max_priority)
