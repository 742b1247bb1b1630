"""Provider-health news through Redis: one channel for the cluster, one hash for late joiners.

Theory of operation: ``tell`` sends one operation of ``HEALTH_LUA`` (fire and
forget, off the request's path): it publishes the news on ``…:hl:news`` with the
sender's id (a node ignores its own), and for opens and cool-downs records
``<kind>|<deployment>`` → expiry by Redis's clock in the hash ``…:hl:s``, which
expires with its longest entry. A node that starts, or whose bus reconnects after
an outage (news published meanwhile was lost: pub/sub is at most once), reads the
hash back (``SNAPSHOT``: the entries still in force, as seconds left) and applies
them. So a peer's open or cool-down reaches a node within one pub/sub hop, or by
its next (re)connect.

Probe verdicts are news only, not recorded: every node probes for itself, so a
lost one is corrected by the next probe.

Redis failure: news that cannot be sent is dropped (and opens the shared
``RedisBreaker``); each node keeps judging what it sees itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgpack

from ._batch import RedisUnavailable
from ._bus import Bus
from ._health import HealthNews, HealthNewsBus
from ._script import RedisBreaker, Script

log = logging.getLogger("hapax.state")

_TELL, _SNAPSHOT = 1, 2

HEALTH_LUA = r"""
local ops = cmsgpack.unpack(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, op in ipairs(ops) do
  local code, p = op[1], op[2]
  local h = p .. ':hl:s'
  if code == 1 then
    -- {1, p, node, kind, target, ms, status}
    local kind, target, ms = op[4], op[5], op[6]
    if kind ~= 'probe' and ms > 0 then
      local field = kind .. '|' .. target
      local old = tonumber(redis.call('HGET', h, field) or '0')
      if now + ms > old then redis.call('HSET', h, field, now + ms) end
      if redis.call('PTTL', h) < ms then redis.call('PEXPIRE', h, ms) end
    end
    redis.call('PUBLISH', p .. ':hl:news', cmsgpack.pack({op[3], kind, target, ms, op[7]}))
    out[#out + 1] = 1
  else
    -- {2, p}: entries in force, as {kind, target, ms left}
    local live = {}
    local all = redis.call('HGETALL', h)
    for i = 1, #all, 2 do
      local left = tonumber(all[i + 1]) - now
      if left > 0 then
        local sep = string.find(all[i], '|', 1, true)
        live[#live + 1] = {string.sub(all[i], 1, sep - 1), string.sub(all[i], sep + 1), left}
      else
        redis.call('HDEL', h, all[i])
      end
    end
    out[#out + 1] = live
  end
end
return cmsgpack.pack(out)
"""


class RedisHealthNews(HealthNewsBus):
    def __init__(
        self, script: Script, bus: Bus, breaker: RedisBreaker, *, key_prefix: str = "hapax", cluster: str = "hapax"
    ) -> None:
        self.script = script
        self.breaker = breaker
        self.prefix = f"{key_prefix}:{cluster}"
        self.node = os.urandom(6).hex()
        self._tasks: set[asyncio.Task[Any]] = set()
        bus.listen(f"{self.prefix}:hl:news", self._on_message)
        bus.on_connect.append(self._replay_soon)

    def tell(self, news: HealthNews) -> None:
        if not self.breaker.allow():
            return
        op = [_TELL, self.prefix, self.node, news.kind, news.target, int(news.seconds * 1000), news.status]
        self._spawn(self._send(op))

    async def _send(self, op: list[Any]) -> None:
        try:
            await self.script.call(op)
        except RedisUnavailable as exc:
            self.breaker.failed(exc)
            return
        self.breaker.ok()

    def _on_message(self, data: bytes) -> None:
        node, kind, target, ms, status = msgpack.unpackb(data, raw=False)
        if node != self.node and self.on_news is not None:
            self.on_news(HealthNews(kind, target, ms / 1000.0, status))

    def _replay_soon(self) -> None:
        self._spawn(self.replay())

    async def replay(self) -> None:
        """Apply the opens and cool-downs still in force (at start-up and after a reconnect)."""
        try:
            live = await self.script.call([_SNAPSHOT, self.prefix])
        except RedisUnavailable as exc:
            self.breaker.failed(exc)
            return
        if self.on_news is not None:
            for kind, target, ms in live:
                self.on_news(HealthNews(kind, target, ms / 1000.0))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        try:
            await self.script.load()
        except RedisUnavailable as exc:
            log.warning("redis not reachable at start-up for health: %s", exc)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
