"""One Lua script called by SHA, every call bounded by a timeout.

The routing seams (slots, dedup, health) send one operation per call, in the
same convention as the access state's scripts: ``ARGV[1]`` is a msgpack list of
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

log = logging.getLogger("hapax.state")


class RedisUnavailable(Exception):
    """Redis did not answer in time, or refused; shared routing state falls back to local."""


class Script:
    def __init__(self, client: Redis, source: str, *, timeout: float) -> None:
        self.client = client
        self._source = source.encode()
        self.sha = hashlib.sha1(self._source).hexdigest()
        self.timeout = timeout

    async def call(self, op: list[Any]) -> Any:
        # Lua's cmsgpack knows no bin type: bytes go as raw strings, as Lua holds them.
        packed = msgpack.packb([op], use_bin_type=False)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    raw = await self.client.evalsha(self.sha, 0, packed)
                except NoScriptError:
                    await self.client.script_load(self._source)
                    raw = await self.client.evalsha(self.sha, 0, packed)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")) from exc
        return msgpack.unpackb(raw, raw=False)[0]

    async def load(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.client.script_load(self._source)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}") from exc


class RedisBreaker:
    """Whether the routing seams should try Redis now: one breaker shared by slots, dedup and health.

    Closed while Redis answers. The first failure opens it (``on_change(True)``,
    one warning) and for ``retry_interval`` seconds nobody waits on Redis; then one
    caller probes (``allow`` says yes to that one only) and a success closes it
    (``on_change(False)``). The access state keeps a breaker of its own with the
    same rule; node reports the two through one ``hapax_degraded`` gauge.
    """

    def __init__(self, *, retry_interval: float, clock: Callable[[], float]) -> None:
        self.retry_interval = retry_interval
        self._clock = clock
        self.degraded = False
        self._retry_at = 0.0
        self._probing = False
        self.on_change: Callable[[bool], None] | None = None

    def allow(self) -> bool:
        if not self.degraded:
            return True
        if self._probing or self._clock() < self._retry_at:
            return False
        self._probing = True
        return True

    def failed(self, exc: BaseException) -> None:
        self._probing = False
        self._retry_at = self._clock() + self.retry_interval
        if self.degraded:
            return
        self.degraded = True
        log.warning("redis unavailable for routing state (%s): slots, dedup and health are local", exc)
        if self.on_change is not None:
            self.on_change(True)

    def ok(self) -> None:
        self._probing = False
        if not self.degraded:
            return
        self.degraded = False
        log.info("redis reachable again: slots, dedup and health are shared again")
        if self.on_change is not None:
            self.on_change(False)
