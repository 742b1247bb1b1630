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
import logging
import signal
import time
from pathlib import Path

from aiohttp import web

from hapax import Config, ConfigError, Gateway, HapaxError, Request, load_config
from hapax._access import AccessControl
from hapax._config import config_findings
from hapax._errors import PayloadTooLarge

from . import logs
from .upstream import transport_factory

log = logging.getLogger("hapax.node")


class FrontDoor:
    """Adapts aiohttp requests to the gateway and writes its responses back."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        limit = self.gateway.runtime.config.server.max_body_bytes
        body = b""
        reject: HapaxError | None = None
        if request.can_read_body:
            cl = request.content_length
            if cl is not None and cl > limit:
                reject = PayloadTooLarge(f"request body is {cl} bytes; the limit is {limit}")
            else:
                read = await _read_limited(request, limit)
                if read is None:
                    reject = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                else:
                    body = read
        req = Request(
            method=request.method,
            path=request.path,
            headers=request.headers,
            body=body,
            remote=request.remote or "",
            query=request.query if request.query_string else {},  # parsing costs; most have none
        )
        resp = await self.gateway.handle(req, reject=reject)
        if resp.stream is None:
            out = web.Response(status=resp.status, body=resp.body, headers=resp.headers)
            if reject is not None:
                out.force_close()  # the unread body is still on the wire
            return out
        sresp = web.StreamResponse(status=resp.status, headers=resp.headers)
        stream = resp.stream
        try:
            await sresp.prepare(request)
            async for chunk in stream:
                await sresp.write(chunk)
            await sresp.write_eof()
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return sresp


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

    def __init__(self, config: Config, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        access = AccessControl(config, state_dir=state_dir(config, config_path))
        self.gateway = Gateway(config, transport_factory=transport_factory, access=access)
        self._stop = asyncio.Event()
        self._reload_now = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        self._file_stamp: tuple[int, int, int, int] | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        srv = self.config.server
        server = web.Server(FrontDoor(self.gateway), handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, srv.host, srv.port, reuse_port=True, backlog=1024)
        await site.start()
        self.addresses = [f"{a[0]}:{a[1]}" for a in self._runner.addresses if isinstance(a, tuple)]
        self.gateway.start()
        log.info("listening", extra={"fields": {"addresses": self.addresses}})
        if self.config_path is not None:
            self._file_stamp = _stamp(self.config_path)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_now.set)
        await self.start()
        watcher = asyncio.create_task(self._watch_config())
        try:
            await self._stop.wait()
        finally:
            watcher.cancel()
            await self.drain()

    async def drain(self) -> None:
        grace = self.gateway.runtime.config.server.shutdown_grace
        started = time.monotonic()
        log.info("draining", extra={"fields": {"in_flight": self.gateway.in_flight, "grace_s": grace}})
        self.gateway.draining = True
        assert self._runner is not None
        delay = self.gateway.runtime.config.server.drain_delay
        if delay:
            await asyncio.sleep(delay)
        for site in list(self._runner.sites):
            await site.stop()
        deadline = started + grace
        while self.gateway.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.gateway.in_flight
        await self._runner.cleanup()
        await self.gateway.aclose()
        log.info("stopped", extra={"fields": {"abandoned_requests": left}})

    async def _watch_config(self) -> None:
        """Poll the config file (and answer SIGHUP) until cancelled; nothing else stops it.

        A watcher that dies takes reloads with it, silently, until a restart: so every
        failure of one round is logged, counted as a failed reload, and the loop goes on.
        """
        if self.config_path is None:
            return
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.gateway.metrics.config_reloads.inc("failure")
                log.exception("config watcher failed; keeping the last good config and watching on")
                # Pace a fault that repeats every round: one log line per interval, not a spin.
                await asyncio.sleep(self.gateway.runtime.config.server.reload_interval)

    async def _watch_once(self) -> None:
        assert self.config_path is not None
        interval = self.gateway.runtime.config.server.reload_interval
        try:
            await asyncio.wait_for(self._reload_now.wait(), interval)
            forced = True
        except TimeoutError:
            forced = False
        self._reload_now.clear()
        stamp = _stamp(self.config_path)
        if not forced and stamp == self._file_stamp:
            return
        if not forced:
            # A writer that rewrites the file in place is caught mid-write by a poll; wait
            # for the stamp to hold still a moment, so a half-written file is read rarely
            # (and rejected by validation when it is).
            await asyncio.sleep(min(_SETTLE_S, interval))
            again = _stamp(self.config_path)
            if again != stamp:
                return  # still changing: the next round looks again
        self._file_stamp = stamp
        # Parsing is CPU work (a large file, a deep one): off the event loop.
        result = await asyncio.to_thread(self._load)
        self._apply(result)

    def reload(self) -> bool:
        """Load the config file and apply it now; ``False`` (last good kept) when it is invalid."""
        return self._apply(self._load())

    def _load(self) -> Config | ConfigError:
        assert self.config_path is not None
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            return exc
        except Exception as exc:  # load_config should raise nothing else; if it does, still keep serving
            log.exception("config reload failed unexpectedly")
            return ConfigError(f"unexpected {type(exc).__name__} while loading")

    def _apply(self, result: Config | ConfigError) -> bool:
        m = self.gateway.metrics
        if isinstance(result, ConfigError):
            m.config_reloads.inc("failure")
            log.error(
                "config reload rejected; keeping the last good config",
                extra={"fields": {"path": str(self.config_path), "error": str(result)}},
            )
            return False
        cfg = result
        old = self.gateway.runtime.config
        if (cfg.server.host, cfg.server.port) != (old.server.host, old.server.port):
            log.warning("server.host/port changes take effect on restart only")
        logs.configure(cfg.logging)
        rt = self.gateway.apply(cfg)
        m.config_reloads.inc("success")
        log.info("config reloaded", extra={"fields": {"generation": rt.generation}})
        log_findings(cfg)
        return True


#: How long a changed config file must hold still before it is read, seconds.
_SETTLE_S = 0.1


def log_findings(cfg: Config) -> None:
    """Log what ``hapax config validate`` would flag in a config that is valid."""
    for _level, msg in config_findings(cfg):
        if not msg.startswith("auth.mode: none"):  # AccessControl says that one, louder
            log.warning("config: %s", msg)


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file does. ``stat`` follows symlinks, so a Kubernetes
    ConfigMap update (the ``..data`` symlink swapped to a new directory) changes the
    inode and device even when size and mtime happen to match."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def state_dir(config: Config, config_path: Path | None) -> Path | None:
    """``auth.state_dir``; a relative one is relative to the config file, not the cwd."""
    d = config.auth.state_dir
    if d is None:
        return None
    p = Path(d).expanduser()
    if not p.is_absolute() and config_path is not None:
        p = config_path.resolve().parent / p
    return p


def serve(config: Config, *, config_path: Path | None = None) -> None:
    logs.configure(config.logging)
    log_findings(config)
    if config_path is None:
        log.warning("no --config given: serving the embedded demo (mock provider, memory state)")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(Node(config, config_path=config_path).run())
