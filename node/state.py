"""The routing state a node shares through Redis: slots and the queue, dedup, provider health.

``node`` is the composition root: without ``state.redis.url`` the dispatcher
builds its memory backends itself and this module builds nothing. With it, the
seams use the access state's Redis client and its batcher (one kept connection,
one write per loop iteration for every seam; every round trip bounded by
``state.redis.timeout``) and its breaker around Redis (so the node has one
degraded state), plus one more connection for the pub/sub bus (it blocks
reading, so it has no read timeout).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from hapax import Config
from hapax.state import (
    DEDUP_LUA,
    HEALTH_LUA,
    SLOTS_LUA,
    AccessStateBreaker,
    Bus,
    FailoverState,
    RedisHealthNews,
    RedisInFlight,
    RedisSlots,
    Script,
)


class RoutingState:
    def __init__(self, config: Config, access: FailoverState) -> None:
        st = config.state
        r = st.redis
        assert r.url is not None
        extra: dict[str, Any] = {}
        if r.password is not None:
            extra["password"] = r.password.get_secret_value()
        if r.tls_ca_file is not None:
            extra["ssl_ca_certs"] = r.tls_ca_file
        #: The access state's client (one pool), which it closes.
        self.client: Redis = access.shared.client
        self.bus = Bus(Redis.from_url(r.url, socket_connect_timeout=r.timeout, **extra), timeout=r.timeout)
        # The access state's breaker: one per node, one degraded gauge, one log line per transition.
        self.breaker = AccessStateBreaker(access)
        # The access state's batcher: what every seam queues in one loop iteration leaves in one
        # write on its one kept connection, so a request's Redis work costs as few round trips as can be.
        self._scripts = [Script(self.client, src, timeout=r.timeout, batch=access.shared.batch)
                         for src in (SLOTS_LUA, DEDUP_LUA, HEALTH_LUA)]
        self.slots = RedisSlots(
            self._scripts[0], self.bus, self.breaker,
            key_prefix=r.key_prefix, cluster=st.cluster, lease_seconds=st.lease_seconds,
            workers=access.workers, on_redis_failure=st.on_redis_failure,
        )
        self.dedup = RedisInFlight(
            self._scripts[1], self.bus, self.breaker,
            key_prefix=r.key_prefix, cluster=st.cluster, lease_seconds=st.lease_seconds,
        )
        self.health = RedisHealthNews(
            self._scripts[2], self.bus, self.breaker,
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
        for script in self._scripts:
            await script.aclose()
        await self.bus.aclose()

