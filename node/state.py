"""The routing state a node shares through Redis: slots and the queue, dedup, provider health.

``node`` is the composition root: without ``state.redis.url`` the dispatcher
builds its memory backends itself and this module builds nothing. With it, one
Redis client for calls (every call bounded by ``state.redis.timeout``), one more
for the pub/sub bus (it blocks reading, so it has no read timeout), one breaker
around Redis for the routing seams, and the seams themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hapax import Config, GatewayMetrics
from hapax.state import (
    DEDUP_LUA,
    HEALTH_LUA,
    SLOTS_LUA,
    Bus,
    RedisBreaker,
    RedisHealthNews,
    RedisInFlight,
    RedisSlots,
    Script,
)

#: Seconds between probes of a Redis found down (as the access state's breaker).
RETRY_INTERVAL = 1.0


class Degraded:
    """``hapax_degraded{dependency="redis"}``: 1 while any seam finds Redis down."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self._down: set[str] = set()
        metrics.degraded.set("redis", to=0)

    def source(self, name: str) -> Callable[[bool], None]:
        def changed(down: bool) -> None:
            if down:
                self._down.add(name)
            else:
                self._down.discard(name)
            self._metrics.degraded.set("redis", to=1 if self._down else 0)

        return changed


class RoutingState:
    def __init__(self, config: Config, degraded: Degraded) -> None:
        st = config.state
        r = st.redis
        assert r.url is not None
        extra: dict[str, Any] = {}
        if r.password is not None:
            extra["password"] = r.password.get_secret_value()
        if r.tls_ca_file is not None:
            extra["ssl_ca_certs"] = r.tls_ca_file
        # One immediate retry (a connection gone stale across a Redis restart), no backoff:
        # the failure policy must decide now, not after redis-py's seconds of backoff.
        self.client = Redis.from_url(
            r.url, socket_timeout=r.timeout, socket_connect_timeout=r.timeout, health_check_interval=0,
            retry=Retry(NoBackoff(), 1), **extra,
        )
        self.bus = Bus(Redis.from_url(r.url, socket_connect_timeout=r.timeout, **extra), timeout=r.timeout)
        self.breaker = RedisBreaker(retry_interval=RETRY_INTERVAL, clock=time.monotonic)
        self.breaker.on_change = degraded.source("routing")
        self.slots = RedisSlots(
            Script(self.client, SLOTS_LUA, timeout=r.timeout), self.bus, self.breaker,
            key_prefix=r.key_prefix, cluster=st.cluster, lease_seconds=st.lease_seconds,
            workers=live_workers(), on_redis_failure=st.on_redis_failure,
        )
        self.dedup = RedisInFlight(
            Script(self.client, DEDUP_LUA, timeout=r.timeout), self.bus, self.breaker,
            key_prefix=r.key_prefix, cluster=st.cluster, lease_seconds=st.lease_seconds,
        )
        self.health = RedisHealthNews(
            Script(self.client, HEALTH_LUA, timeout=r.timeout), self.bus, self.breaker,
            key_prefix=r.key_prefix, cluster=st.cluster,
        )

    async def start(self) -> None:
        await self.bus.start()
        await self.slots.start()
        await self.dedup.start()
        await self.health.start()

    async def aclose(self) -> None:
        await self.slots.aclose()
        await self.dedup.aclose()
        await self.health.aclose()
        await self.bus.aclose()
        await self.client.aclose()


def live_workers() -> int:
    """Worker processes sharing this node's limits (``HAPAX_WORKERS``; 1 without it)."""
    try:
        return max(1, int(os.environ.get("HAPAX_WORKERS", "1")))
    except ValueError:
        return 1
