"""The HTTP/1.1 front door (aiohttp's low-level server) and the process lifecycle.

aiohttp's ``web.Application`` router and middleware chain cost CPU on every
request; the gateway has its own fixed routes, so it sits on the low-level
``web.Server`` and adapts each request into ``hapax.Request`` directly.

Lifecycle: ``serve`` runs until SIGTERM/SIGINT, then drains: readiness turns
false, the listening sockets close (no new connections), requests and streams
in flight get up to ``server.shutdown_grace`` seconds to finish, and the
process exits 0. SIGHUP reloads the config file now.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aetcd
import orjson
from aiohttp import web

import coordinator
from hapax import (
    ClientWriteTimeout,
    Config,
    Exposition,
    Gateway,
    GatewayMetrics,
    HapaxError,
    PayloadTooLarge,
    Request,
    RequestTimeout,
    ShuttingDown,
    freeze_gc,
)
from hapax.access import AccessControl, KeyStore, RedisKeyStore, RedisUsage
from hapax.config import (
    ConfigEvent,
    ConfigRejected,
    ConfigSnapshot,
    ConfigSource,
    Secrets,
    config_findings,
    read_api_key_files,
)
from hapax.routing import Dispatcher
from hapax.state import AccessState, Batcher, FailoverState, MemoryState, RedisState

from . import limits, logs, peers
from .cluster import ClusterMember
from .config_watch import FileConfigSource
from .peers import PeerServer
from .protocol import SERVER_HEADER, GuardedHandler, Listener
from .state import RoutingState
from .upstream import transport_factory
from .workers import WorkerIdentity

if TYPE_CHECKING:
    from .http3 import Http3Door

log = logging.getLogger("hapax.node")

#: Seconds to write a cut stream's closing events; a client that takes none is dropped.
_CUT_WRITE_TIMEOUT: Final = 1.0
#: Seconds open streams get to take their closing events when the shutdown grace ends.
CUT_WAIT: Final = 2.0
#: Seconds between checks of the file-descriptor use.
_FD_CHECK_INTERVAL: Final = 5.0


class FrontDoor:
    """Adapts aiohttp requests to the gateway and writes its responses back.

    The connection-level limits live in ``node.protocol``; this reads bodies within
    ``server.body_timeout``, answers ``Expect: 100-continue`` once the head has passed
    the checks that need no body, and ends streams the server cuts (a client that
    stopped reading, the end of the shutdown grace) with the right record.
    """

    def __init__(self, gateway: Gateway, *, worker: str | None = None) -> None:
        self.gateway = gateway
        #: ``x-hapax-worker`` on every response of a node with several workers: which one answered.
        self.worker = worker
        #: Headers every response gets, computed once: ``x-hapax-worker``, and ``alt-svc`` while
        #: the HTTP/3 door is on (``advertise``); empty, they cost one truth test per request.
        self.extra_headers: dict[str, str] = {"x-hapax-worker": worker} if worker is not None else {}
        #: Set by ``Node.start``; counts and logs closes the front door decides.
        self.listener: Listener | None = None
        self.shutting_down = False
        self._streams: set[asyncio.Task[Any]] = set()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, GuardedHandler):
            protocol.request_started()
        srv = self.gateway.runtime.config.server
        limit = srv.max_body_bytes
        body = b""
        reject: HapaxError | None = None
        #: No body will come (refused before a 100-continue) or it comes too slowly: answer and
        #: close now, without aiohttp's lingering read of the rest (up to 10 s more).
        close_now = False
        if request.can_read_body:
            expect = request.headers.get("expect")
            waits = expect is not None and expect.lower() == "100-continue" and request.version >= (1, 1)
            cl = request.content_length
            if cl is not None and cl > limit:
                reject = PayloadTooLarge(f"request body is {cl} bytes; the limit is {limit}")
                close_now = waits
            else:
                if waits:  # the client sends its body only after a 100: check what we can first
                    reject = await self.gateway.precheck(_request(request, b""))
                    close_now = reject is not None
                    if reject is None:
                        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if reject is None:
                    body, reject = await self._read_body(request, limit, srv.body_timeout)
        resp = await self.gateway.handle(_request(request, body), reject=reject)
        resp.headers["server"] = SERVER_HEADER
        if self.extra_headers:
            resp.headers.update(self.extra_headers)
        if resp.stream is None:
            out = web.Response(status=resp.status, body=resp.body, headers=resp.headers)
            if reject is not None:
                out.force_close()  # the unread body is still on the wire
                if close_now or isinstance(reject, RequestTimeout):
                    await out.prepare(request)
                    await out.write_eof()
                    protocol.force_close()
            return out
        return await self._stream(request, resp.headers, resp.status, resp.stream)

    async def _read_body(self, request: web.BaseRequest, limit: int, timeout: float) -> tuple[bytes, HapaxError | None]:
        try:
            if request.content.is_eof():
                read = await _read_limited(request, limit)  # all in already: no timer needed
            else:
                async with asyncio.timeout(timeout):
                    read = await _read_limited(request, limit)
        except TimeoutError:
            if self.listener is not None:
                self.listener.closed("body_timeout", "closed a connection whose request body was too slow")
            return b"", RequestTimeout(f"the request body did not arrive within server.body_timeout ({timeout:g} s)")
        if read is None:
            return b"", PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return read, None

    async def _stream(
        self, request: web.BaseRequest, headers: dict[str, str], status: int, stream: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        sresp = web.StreamResponse(status=status, headers=headers)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        cut = getattr(stream, "cut", None)
        try:
            await sresp.prepare(request)
            async for chunk in stream:
                await sresp.write(chunk)
            await sresp.write_eof()
        except asyncio.CancelledError:
            protocol = request.protocol
            if isinstance(protocol, GuardedHandler) and protocol.cut_reason == "write_timeout":
                if cut is not None:
                    cut(ClientWriteTimeout(
                        "the client did not read its response within server.stream_write_timeout"
                    ))
                raise
            if not self.shutting_down or cut is None or protocol.transport is None:
                raise  # the client hung up
            # Node.drain cancelled us at the end of the grace: say so to the client, then end.
            task.uncancel()
            tail = cut(ShuttingDown("the server is shutting down; retry on another node"))
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(_CUT_WRITE_TIMEOUT):
                    await sresp.write(tail)
                    await sresp.write_eof()
            if self.listener is not None:
                self.listener.closed("shutdown", "ended a stream at the end of the shutdown grace")
        finally:
            self._streams.discard(task)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return sresp

    def advertise(self, alt_svc: str | None) -> None:
        """Say (or stop saying) on every response where the HTTP/3 door listens."""
        if alt_svc is None:
            self.extra_headers.pop("alt-svc", None)
        else:
            self.extra_headers["alt-svc"] = alt_svc

    def cut_streams(self) -> int:
        """End every open stream with a ``shutting_down`` error event; how many there were."""
        self.shutting_down = True
        for task in list(self._streams):
            task.cancel()
        return len(self._streams)

    @property
    def open_streams(self) -> int:
        return len(self._streams)


def _request(request: web.BaseRequest, body: bytes) -> Request:
    return Request(
        method=request.method,
        path=request.path,
        headers=request.headers,
        body=body,
        remote=request.remote or "",
        query=request.query if request.query_string else {},  # parsing costs; most have none
    )


async def _read_limited(request: web.BaseRequest, limit: int) -> bytes | None:
    cl = request.content_length
    if cl is not None:
        return await request.content.readexactly(cl) if cl else b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


class Node:
    """One gateway process: front door, config reloads, and a graceful stop."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        prepare: Callable[[Config], Config] | None = None,
        source: ConfigSource | None = None,
        identity: WorkerIdentity | None = None,
    ) -> None:
        """``source`` is where new configs come from; by default the file at ``config_path``
        (``prepare`` applies the command line's overrides to each), or none (no reloads)."""
        self.config = config
        self.config_path = config_path
        self.identity = identity or WorkerIdentity()
        #: With cluster.etcd.endpoints: membership, election, and the config from etcd (node.cluster).
        self.cluster: ClusterMember | None = None
        if source is None and config.cluster.etcd.endpoints:
            self.cluster = ClusterMember(config, identity=self.identity, prepare=prepare)
            source = self.cluster.source
        if source is None and config_path is not None:
            source = FileConfigSource(
                config_path, config, prepare=prepare,
                interval=lambda: self.gateway.runtime.config.server.reload_interval,
            )
        self.source = source
        if source is not None:
            config = self.config = source.current.config  # what the node starts on is the source's
        state = build_state(config)
        # The node's one etcd client: the Coordinator's (keys, reloads and config share it).
        self.etcd: aetcd.Client | None = (
            self.cluster.coordinator.client if self.cluster is not None
            else coordinator.connect(config.cluster.etcd) if config.cluster.etcd.endpoints else None
        )
        keys, usage = shared_stores(
            config, etcd=self.etcd, redis=state.shared.client if isinstance(state, FailoverState) else None
        )
        sdir = state_dir(config, config_path)
        if keys is not None and sdir is not None and (sdir / "keys" / "keys.json").exists():
            log.warning("keys are read from %s; %s is not read (move its keys with hapax keys import)",
                        "etcd" if self.etcd is not None else "Redis", sdir / "keys" / "keys.json")
        # Key, usage and audit writes go to background threads (or Redis): the loop never waits on a disk.
        access = AccessControl(
            config, state_dir=sdir, state=state, write_behind=True, keys=keys, usage=usage
        )
        metrics = GatewayMetrics()
        # Slots, dedup and health shared through Redis when state.redis.url is set.
        self.shared: RoutingState | None = None
        if isinstance(state, FailoverState):
            self.shared = RoutingState(config, state)
        dispatcher = Dispatcher(
            metrics=metrics,
            slots=self.shared.slots if self.shared else None,
            in_flight=self.shared.dedup if self.shared else None,
            health_news=self.shared.health if self.shared else None,
        )
        self.gateway = Gateway(
            source.current if source is not None else config,
            transport_factory=transport_factory, metrics=metrics, access=access,
            dispatcher=dispatcher, access_sink=logs.ACCESS,
            secrets=read_api_key_files(config)[0],  # before the loop runs: an unreadable file fails the start
        )
        #: Re-reads mounted credentials on a cluster-wide ``hapax cluster reload``.
        self.reload_watch: coordinator.ReloadWatch | None = None
        if self.etcd is not None:
            self.reload_watch = coordinator.ReloadWatch(
                self.etcd, cluster=config.state.cluster, timeout=config.cluster.etcd.timeout,
                on_reload=lambda record, rev: self.reload("cluster", request=record.get("id"), revision=rev),
            )
        self._reloading: asyncio.Task[None] | None = None
        if isinstance(state, FailoverState):
            degraded = self.gateway.metrics.degraded
            degraded.set("redis", to=0)
            state.on_change = lambda down: degraded.set("redis", to=1 if down else 0)
            self._count_redis(state.shared.batch)
        logs.WRITER.on_drop = self.gateway.metrics.log_lines_dropped.inc
        if self.cluster is not None:
            self.cluster.attach(self.gateway)
        self._stop = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        ident = self.identity
        self.front = FrontDoor(self.gateway, worker=str(ident.index) if ident.count > 1 else None)
        self.gateway.exposition = Exposition(self.gateway.metrics, worker=ident.index, workers=ident.count)
        self._peers: PeerServer | None = None
        if ident.count > 1 and ident.runtime_dir is not None:
            run_dir, count, me = ident.runtime_dir, ident.count, ident.index
            self._peers = PeerServer(run_dir, me, self._snapshot)
            self.gateway.metrics_peers = lambda: peers.gather(run_dir, count, me)
        self._fd_watch: asyncio.Task[None] | None = None
        self.addresses: list[str] = []
        #: The HTTP/3 door, when ``server.http3.enabled`` (read at start-up only).
        self.h3: Http3Door | None = None

    def _count_redis(self, batch: Batcher) -> None:
        """Round trips to Redis observed as they end; operations read off the batcher at each scrape."""
        m = self.gateway.metrics
        batch.on_round_trip = m.redis_round_trip.observe
        m.redis_round_trip.zero()
        m.redis_operations.zero()
        sent = 0

        def collect() -> None:
            nonlocal sent
            m.redis_operations.inc(by=batch.operations - sent)
            sent = batch.operations

        m.registry.on_collect(collect)

    async def _snapshot(self) -> bytes:
        """This worker's values for a sibling: copied on the loop, encoded in a thread."""
        expo = self.gateway.exposition
        frozen = expo.freeze()
        return await asyncio.to_thread(lambda: orjson.dumps(expo.snapshot(frozen)))

    async def start(self) -> None:
        srv = self.config.server
        fd_limit = limits.raise_nofile()
        cap = limits.connection_cap(self.config)
        if cap < srv.max_connections:
            log.warning(
                "server.max_connections lowered to fit the file-descriptor limit",
                extra={"fields": {"max_connections": srv.max_connections, "effective": cap, "fd_limit": fd_limit}},
            )
        server = Listener(
            self.front,
            config=lambda: self.gateway.runtime.config,
            metrics=self.gateway.metrics,
            handler_cancellation=True,
            access_log=None,
        )
        self.front.listener = server
        self._fd_watch = asyncio.create_task(self._watch_fds())
        await self.gateway.access.start()  # shared keys loaded before the first request
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0, handle_signals=False)
        await self.gateway.access.state.start()
        if self.shared is not None:
            await self.shared.start()
        if self.cluster is not None:
            await self.cluster.start(self._apply)  # bounded: a node without etcd serves its file
        await self._runner.setup()
        site = web.TCPSite(self._runner, srv.host, srv.port, reuse_port=True, backlog=srv.listen_backlog)
        await site.start()
        self.addresses = [f"{a[0]}:{a[1]}" for a in self._runner.addresses if isinstance(a, tuple)]
        if srv.http3.enabled:
            await self._start_http3()
        if self._peers is not None:
            await self._peers.start()
        if self.reload_watch is not None:
            await self.reload_watch.start()
        self.gateway.start()
        fields: dict[str, Any] = {"addresses": self.addresses}
        if self.h3 is not None:
            fields["http3"] = self.h3.address
        if self.identity.count > 1:
            fields.update(worker=self.identity.index, workers=self.identity.count)
        log.info("listening", extra={"fields": fields})

    async def _start_http3(self) -> None:
        from .http3 import Http3Door  # aioquic is imported only by nodes that serve HTTP/3

        self.gateway.metrics.add_protocol("h3")
        listener = self.front.listener
        assert listener is not None
        self.h3 = Http3Door(self.gateway, worker=self.front.worker, closed=listener.closed)
        await self.h3.start()
        self.front.advertise(self.h3.alt_svc())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        fd = self.identity.supervisor_fd
        if fd is not None:
            loop.add_reader(fd, self._supervisor_gone, fd)
        await self.start()
        watcher = asyncio.create_task(self._watch_config())
        try:
            await self._stop.wait()
        finally:
            watcher.cancel()
            await self.drain()

    def _on_hup(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self.reload("signal"))

    async def reload(self, trigger: str, *, request: str | None = None, revision: int | None = None) -> None:
        """Re-read what is mounted: provider ``api_key_file``s and the CA bundle (every provider
        is built anew; requests in flight finish on the old ones), then the config source.

        SIGHUP does it for this node; ``hapax cluster reload`` for every node of the cluster.
        """
        gw = self.gateway
        secrets, problems = await asyncio.to_thread(read_api_key_files, gw.runtime.config, previous=gw.secrets)
        rt = gw.rebuild_providers(secrets)
        if self.source is not None:
            self.source.poke()
        if self.h3 is not None:
            self.h3.reload(force=True)  # the HTTP/3 certificate pair, mounted like the keys
        result = "failure" if problems else "success"
        gw.metrics.reloads.inc(trigger, result)
        fields: dict[str, Any] = {
            "trigger": trigger, "providers": len(rt.providers), "credential_files": len(secrets),
            "generation": rt.generation,
        }
        if request is not None:
            fields.update(request=request, etcd_revision=revision)
        if problems:  # paths and reasons, never a file's content
            fields["problems"] = [f"{where}: {why}" for where, why in problems]
            log.error("reload: some credential files could not be read; those providers keep their "
                      "last key", extra={"fields": fields})
        else:
            log.info("reloaded credentials and certificates", extra={"fields": fields})

    def _supervisor_gone(self, fd: int) -> None:
        """The supervisor's end of the pipe closed: it died (it never writes). Drain and exit."""
        asyncio.get_running_loop().remove_reader(fd)
        log.error("the supervisor is gone; draining this worker")
        self._stop.set()

    async def drain(self) -> None:
        grace = self.gateway.runtime.config.server.shutdown_grace
        started = time.monotonic()
        log.info("draining", extra={"fields": {"in_flight": self.gateway.in_flight, "grace_s": grace}})
        self.gateway.draining = True
        if self.cluster is not None:
            await self.cluster.resign()  # leadership and the member record go now, not at lease expiry
        assert self._runner is not None
        delay = self.gateway.runtime.config.server.drain_delay
        if delay:
            await asyncio.sleep(delay)
        for site in list(self._runner.sites):
            await site.stop()
        if self.h3 is not None:
            self.h3.goaway()
        deadline = started + grace
        while self.gateway.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._fd_watch is not None:
            self._fd_watch.cancel()
        left = self.gateway.in_flight
        doors: list[FrontDoor | Http3Door] = [self.front] if self.h3 is None else [self.front, self.h3]
        if sum(door.cut_streams() for door in doors):
            # Streams still open at the end of the grace get an error event, not a silent cut.
            cut_deadline = time.monotonic() + CUT_WAIT
            while any(door.open_streams for door in doors) and time.monotonic() < cut_deadline:
                await asyncio.sleep(0.02)
        if self.h3 is not None:
            await self.h3.aclose()
        await self._runner.cleanup()
        if self.reload_watch is not None:
            await self.reload_watch.close()
        if self._peers is not None:
            await self._peers.aclose()
        if self.shared is not None:
            # Before the access state closes the Redis client they share.
            await self.shared.aclose()
        await self.gateway.aclose()
        if self.etcd is not None:  # after the key store's watch closed with the gateway
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.etcd.close(), self.config.cluster.etcd.timeout)
        log.info("stopped", extra={"fields": {"abandoned_requests": left}})

    async def _watch_fds(self) -> None:
        while True:
            await asyncio.sleep(_FD_CHECK_INTERVAL)
            limits.check(self.gateway.runtime.config)
            if self.h3 is not None:
                self.h3.reload()  # a certificate pair renewed on disk (a rotated secret)

    async def _watch_config(self) -> None:
        """Apply what the config source yields until cancelled; nothing else stops it.

        A source handles a bad config or a failed round itself (a ``ConfigRejected``);
        should its iterator still end in an exception, it is counted as a failed reload,
        logged, and iterated again: reloads must not die silently until a restart.
        """
        if self.source is None:
            return
        while True:
            try:
                async for event in self.source.updates():
                    secrets = None
                    if isinstance(event, ConfigSnapshot):  # its credential files, read off the loop
                        secrets, _ = await asyncio.to_thread(
                            read_api_key_files, event.config, previous=self.gateway.secrets)
                    self._apply(event, secrets)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.gateway.metrics.config_reloads.inc("failure")
                log.exception("config source failed; keeping the last good config and watching on")
                await asyncio.sleep(self.gateway.runtime.config.server.reload_interval)

    def _apply(self, event: ConfigEvent, secrets: Secrets | None = None) -> bool:
        """Apply a new snapshot, or count a rejected one; ``False`` when the last good stays."""
        m = self.gateway.metrics
        if isinstance(event, ConfigRejected):
            m.config_reloads.inc("failure")
            log.error(
                "config reload rejected; keeping the last good config",
                extra={"fields": {"source": event.source, "error": str(event.error),
                                  "revision": self.gateway.runtime.revision}},
            )
            return False
        cfg = event.config
        old = self.gateway.runtime.config
        if (cfg.server.host, cfg.server.port) != (old.server.host, old.server.port):
            log.warning("server.host/port changes take effect on restart only")
        if (cfg.state.redis, cfg.state.cluster, cfg.state.lease_seconds) != (
            old.state.redis, old.state.cluster, old.state.lease_seconds
        ):
            log.warning("state.redis, state.cluster and state.lease_seconds take effect on restart only")
        if cfg.server.workers != old.server.workers:
            log.warning("server.workers changes take effect on restart only")
        if cfg.server.http3.enabled != old.server.http3.enabled or (
            (cfg.server.http3.host, cfg.server.http3.port) != (old.server.http3.host, old.server.http3.port)
        ):
            log.warning("server.http3.enabled, host and port take effect on restart only")
        logs.configure(cfg.logging)
        rt = self.gateway.apply(event, secrets=secrets)
        if self.h3 is not None:
            self.h3.reload()
            self.front.advertise(self.h3.alt_svc())
        if self.cluster is not None:
            self.cluster.applied(rt.revision)
        m.config_reloads.inc("success")
        log.info("config reloaded", extra={"fields": {
            "revision": rt.revision, "generation": rt.generation, "source": event.source, "digest": event.digest,
        }})
        log_findings(cfg)
        return True




def log_findings(cfg: Config) -> None:
    """Log what ``hapax config validate`` would flag in a config that is valid."""
    for _level, msg in config_findings(cfg):
        if not msg.startswith("auth.mode: none"):  # AccessControl says that one, louder
            log.warning("config: %s", msg)


def build_state(config: Config) -> AccessState:
    """The access-state backend: memory, or Redis (behind its failure policy) with state.redis.url."""
    st = config.state
    r = st.redis
    if r.url is None:
        return MemoryState()
    shared = RedisState.from_url(
        r.url,
        password=r.password.get_secret_value() if r.password is not None else None,
        tls_ca_file=r.tls_ca_file,
        timeout=r.timeout,
        key_prefix=r.key_prefix,
        cluster=st.cluster,
        lease_seconds=st.lease_seconds,
    )
    return FailoverState(shared, workers=live_workers())


def live_workers() -> int:
    """Worker processes sharing this node's limits (``HAPAX_WORKERS``; 1 without it).

    Under ``fail_open`` each worker checks locally against its share of every limit.
    """
    try:
        return max(1, int(os.environ.get("HAPAX_WORKERS", "1")))
    except ValueError:
        return 1


def shared_stores(
    config: Config, *, etcd: aetcd.Client | None = None, redis: Any = None
) -> tuple[KeyStore | None, RedisUsage | None]:
    """The key store and usage store shared through ``state.redis`` (``None``s without it);
    with ``etcd`` (cluster mode) keys live in etcd, last-used times in ``redis`` if given.

    Read once at start: moving a running node to another Redis or cluster takes a restart.
    """
    r = config.state.redis
    keys: KeyStore | None = None
    if etcd is not None:
        keys = coordinator.EtcdKeyStore(
            etcd, cluster=config.state.cluster, timeout=config.cluster.etcd.timeout,
            redis=redis, used_key=f"{r.key_prefix}:{config.state.cluster}:keys:used",
        )
    if r.url is None:
        return keys, None
    keys = keys or RedisKeyStore(r, cluster=config.state.cluster)
    usage = RedisUsage(r, cluster=config.state.cluster, retention_days=config.usage.retention_days,
                       flush_interval=config.usage.flush_seconds(shared=True))
    return keys, usage


def state_dir(config: Config, config_path: Path | None) -> Path | None:
    """``auth.state_dir``; a relative one is relative to the config file, not the cwd."""
    d = config.auth.state_dir
    if d is None:
        return None
    p = Path(d).expanduser()
    if not p.is_absolute() and config_path is not None:
        p = config_path.resolve().parent / p
    return p


#: Collector thresholds for a node. CPython's (700, 10, 10) runs a young collection every
#: 700 net allocations, and with thousands of streams open the full collections they lead to
#: walk every live object: 100-270 ms during which every stream stalls. A node allocates in
#: bursts that mostly die young (refcounting frees them), so a larger young generation costs
#: little memory and makes every collection, and the full ones behind them, rarer. Not too
#: large: a young collection walks the whole young generation, and at 50,000 each took
#: ~48 ms with 2,000 streams open (worst gap p99 220 ms against 176 ms at 7,000).
GC_THRESHOLDS = (7_000, 50, 20)


def tune_gc() -> None:
    """Freeze what start-up built (modules, config, schemas: never garbage, and most of the
    heap) so no collection walks it again, then set ``GC_THRESHOLDS``."""
    gc.collect()
    freeze_gc()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(
    config: Config,
    *,
    config_path: Path | None = None,
    prepare: Callable[[Config], Config] | None = None,
    identity: WorkerIdentity | None = None,
) -> None:
    """Run a node on ``config`` until SIGTERM; ``prepare`` is re-applied to each reloaded file.
    ``identity`` says which worker of a supervisor's this process is (``--workers``)."""
    logs.configure(config.logging)
    if identity is not None and identity.count > 1:
        logs.WRITER.shared()  # siblings write to the same stderr
    log_findings(config)
    if config_path is None:
        log.warning("no --config given: serving the embedded demo (mock provider, memory state)")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        runner = asyncio.run
    else:
        runner = uvloop.run
    node = Node(config, config_path=config_path, prepare=prepare, identity=identity)
    tune_gc()
    try:
        runner(node.run())
    finally:
        # The loop is closed and its signal handlers with it: a repeated SIGTERM (a
        # supervisor or an impatient operator) would now kill the process mid-flush.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        logs.flush()
