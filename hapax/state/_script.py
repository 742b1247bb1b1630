"""One Lua script called by SHA, every call bounded by a timeout.

The routing seams (slots, dedup, health) queue operations, in the same
convention as the access state's scripts: ``ARGV[1]`` is a msgpack list of
operations, the reply a msgpack list of their results. A ``NOSCRIPT`` reply (a
restarted or flushed Redis) loads the script again and sends once more.

Errors: a call that fails or outlasts ``timeout`` raises ``RedisUnavailable``;
the caller's failure policy decides what follows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from ._base import StateUnavailable
from ._batch import RedisUnavailable
from ._failover import FailoverState

log = logging.getLogger("hapax.state")


class Script:
    """Calls of one script, coalesced: the operations of one loop iteration go in one ``EVALSHA``.

    One awaited redis-py call costs ~120 µs of client CPU, and a node under load
    makes many at once (/work/shared/notes/redis-client-cost.md). ``call`` queues its
    operation; the queue leaves at the end of the loop iteration as one call whose
    ``ARGV[1]`` is the list of operations, each caller getting its own result. While
    a call is on the wire the next batch gathers, and leaves when it returns.

    The access state's ``Batcher`` (``_batch``) does the same over a pipeline of its
    scripts; the routing seams keep their own because their operations carry bytes
    (a dedup result), which must go as msgpack raw strings (``use_bin_type=False``):
    Redis's Lua ``cmsgpack`` rejects the bin type that ``Batcher`` packs bytes as.
    """

    def __init__(self, client: Redis, source: str, *, timeout: float) -> None:
        self.client = client
        self._source = source.encode()
        self.sha = hashlib.sha1(self._source).hexdigest()
        self.timeout = timeout
        self._pending: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Round trips and operations sent (tests, the benchmark).
        self.round_trips = 0
        self.operations = 0

    def call(self, op: list[Any]) -> asyncio.Future[Any]:
        """Queue ``op``; the future gets its result, or ``RedisUnavailable``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, fut))
        if not self._scheduled and not self._sending:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if self._sending or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._sending = True
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        try:
            try:
                results = await self._round_trip([op for op, _ in batch])
            except RedisUnavailable as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
        finally:
            self._sending = False
            if self._pending:
                self._flush()

    async def _round_trip(self, ops: list[list[Any]]) -> list[Any]:
        # Lua's cmsgpack knows no bin type: bytes go as raw strings, as Lua holds them.
        packed = msgpack.packb(ops, use_bin_type=False)
        self.round_trips += 1
        self.operations += len(ops)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    raw = await self.client.evalsha(self.sha, 0, packed)
                except NoScriptError:
                    await self.client.script_load(self._source)
                    raw = await self.client.evalsha(self.sha, 0, packed)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")) from exc
        return list(msgpack.unpackb(raw, raw=False))

    async def load(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.client.script_load(self._source)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        """Wait for calls on the wire (each bounded by the timeout)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class RedisBreaker:
    """Whether the routing seams should try Redis now: one breaker shared by slots, dedup and health.

    Closed while Redis answers. The first failure opens it (``on_change(True, why)``)
    and for ``retry_interval`` seconds nobody waits on Redis; then one caller
    probes (``allow`` says yes to that one only) and a success closes it
    (``on_change(False, "")``). The access state keeps a breaker of its own with
    the same rule; node reports the two as one ``hapax_degraded`` gauge and one log
    line per transition of the node. (Under ``node``, ``AccessStateBreaker`` takes
    its place: the two are one.)
    """

    def __init__(self, *, retry_interval: float, clock: Callable[[], float]) -> None:
        self.retry_interval = retry_interval
        self._clock = clock
        self._degraded = False
        self._retry_at = 0.0
        self._probing = False
        self.on_change: Callable[[bool, str], None] | None = None

    @property
    def degraded(self) -> bool:
        return self._degraded

    def allow(self) -> bool:
        if not self._degraded:
            return True
        if self._probing or self._clock() < self._retry_at:
            return False
        self._probing = True
        return True

    def failed(self, exc: BaseException) -> None:
        self._probing = False
        self._retry_at = self._clock() + self.retry_interval
        if self._degraded:
            return
        self._degraded = True
        log.debug("routing state: redis unavailable: %s", exc)
        if self.on_change is not None:
            self.on_change(True, str(exc))

    def ok(self) -> None:
        self._probing = False
        if not self._degraded:
            return
        self._degraded = False
        if self.on_change is not None:
            self.on_change(False, "")


class AccessStateBreaker(RedisBreaker):
    """The routing seams' breaker *is* the access state's: one breaker around Redis per node.

    Either side that finds Redis down opens it, and either side's probe closes it,
    so a node has one degraded state, one ``hapax_degraded`` transition and one log
    line per transition (``FailoverState``'s), whichever seam noticed first. It
    drives ``FailoverState``'s breaker fields directly: that class has no public
    hooks for a second user (yet).
    """

    def __init__(self, access: FailoverState) -> None:
        super().__init__(retry_interval=access.retry_interval, clock=access._mono)
        self.access = access

    @property
    def degraded(self) -> bool:
        return self.access.degraded

    def allow(self) -> bool:
        a = self.access
        if not a.degraded:
            return True
        if a._probing or a._mono() < a._retry_at:
            return False
        a._probing = True
        return True

    def failed(self, exc: BaseException) -> None:
        a = self.access
        a._probing = False
        if a.degraded:
            a._retry_at = a._mono() + a.retry_interval
        else:
            a._down(exc if isinstance(exc, StateUnavailable) else StateUnavailable(str(exc)))

    def ok(self) -> None:
        a = self.access
        if a.degraded:
            a._probing = False
            a._up()
