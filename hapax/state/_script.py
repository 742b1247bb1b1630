"""One Lua script called by SHA, every call bounded by a timeout.

The routing seams (slots, dedup, health) queue operations, in the same
convention as the access state's scripts: ``ARGV[1]`` is a msgpack list of
operations, the reply a msgpack list of their results. A ``Batcher`` sends them
(``_batch``): one write per loop iteration, on one kept connection, shared with
the access state's scripts under ``node``. A ``NOSCRIPT`` reply (a restarted or
flushed Redis) loads the scripts again and sends once more.

Errors: a call that fails or outlasts ``timeout`` raises ``RedisUnavailable``;
the caller's failure policy decides what follows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ._base import StateUnavailable
from ._batch import Batcher, RedisUnavailable
from ._failover import FailoverState

log = logging.getLogger("hapax.state")


class Script:
    """One Lua script's calls, sent by a ``Batcher``: the operations of one loop iteration in one ``EVALSHA``.

    One awaited redis-py call costs ~120 µs of client CPU, and a node under load
    makes many at once (/work/shared/notes/redis-client-cost.md). ``call`` queues its
    operation; the queue leaves at the end of the loop iteration as one call whose
    ``ARGV[1]`` is the list of operations, each caller getting its own result.

    Given ``batch`` (under ``node``, the access state's), the script's calls share its
    writes and its kept connection with every other seam: what slots, dedup, health
    and the access state queue in one loop iteration leaves as one write and costs
    one round trip. Without it, the script has a batcher of its own.
    """

    def __init__(self, client: Redis, source: str, *, timeout: float, batch: Batcher | None = None) -> None:
        self.client = client
        self._source = source.encode()
        self.sha = hashlib.sha1(self._source).hexdigest()
        self.timeout = timeout
        self._own = batch is None
        self.batch = Batcher(client, timeout=timeout) if batch is None else batch
        self._index = self.batch.add(source)

    @property
    def round_trips(self) -> int:
        """Round trips of its batcher (shared: every seam's), for tests and the benchmark."""
        return self.batch.round_trips

    @property
    def operations(self) -> int:
        return self.batch.operations

    def call(
        self, op: list[Any], *, on_error: Callable[[BaseException], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``op``; the future gets its result, or ``RedisUnavailable``.

        Given ``on_error``, a failure goes to it and the future resolves to ``None``:
        work fired from the request path that nobody awaits needs no task of its own.
        """
        return self.batch.submit(self._index, op, on_error=on_error)

    async def load(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.client.script_load(self._source)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        """Send what is queued and wait for calls on the wire (each bounded by the timeout).

        A shared batcher stays open: its owner (the access state) closes it.
        """
        if self._own:
            await self.batch.aclose()
        else:
            await self.batch.drain()


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
