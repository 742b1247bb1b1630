"""Concurrency slots and the priority queue in Redis: one table for every node of a cluster.

Theory of operation: the same grant rule as ``SlotTable`` (``_slots``), kept in
Redis and applied by one Lua script, so no two processes can interleave. A held
slot is a member of one sorted set per limited key (``…:sl:h:<key>``), scored by
its lease's expiry; a key has room while its live members are fewer than its
limit. Keys without a limit are never sent to Redis: a request whose first
choice is unlimited (no ``max_concurrency`` anywhere, the default) costs no
round trip at all.

A request that finds no room queues: a member of ``…:sl:q`` scored by priority,
named ``<seq>:<id>`` with ``seq`` from one cluster-wide counter, so the set's own
order is (priority, arrival) across every process; its alternatives, its
process and its lease are in ``…:sl:w``. Every release (and every sweep that
finds expired leases) runs the grant pass over the queue in that order, takes the
slot for each waiter that now fits, records the grant (``…:sl:g:<id>``, a short
lease) and publishes it on the waiter's process channel (``…:sl:wake:<node>``):
the waiter wakes on the message, whichever process freed the slot. No polling.

Leases: held slots and queue places expire unless renewed; each process renews
its own every third of ``lease_seconds`` in one call, which also runs the grant
pass (so slots of a process that died come back to the waiters within a lease)
and reports grants whose message was lost (pub/sub is at most once; the bus also
reconciles on every reconnect).

Redis failure (an error, or no answer within ``timeout``): the shared
``RedisBreaker`` opens and requests use a local ``SlotGate`` whose limits are the
shared ones divided by the live worker count (``fail_open``), or are refused with
429 ``state_unavailable`` (``fail_closed``). A slot taken in Redis whose release
cannot reach it expires with its lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from .._errors import RateLimited
from ._background import Background
from ._batch import RedisUnavailable
from ._bus import Bus
from ._script import RedisBreaker, Script
from ._slots import Alternatives, Overloaded, Slot, SlotGate, Slots

log = logging.getLogger("hapax.state")

_ACQUIRE, _RELEASE, _CANCEL, _RENEW = 1, 2, 3, 4

SLOTS_LUA = r"""
local ops = cmsgpack.unpack(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local KEEP = 60000  -- a key outlives its last lease by this much
local out = {}

local swept, freed = {}, false
local function count(p, key)
  local k = p .. ':sl:h:' .. key
  if not swept[k] then
    swept[k] = true
    if redis.call('ZREMRANGEBYSCORE', k, '-inf', now) > 0 then freed = true end
  end
  return redis.call('ZCARD', k)
end

-- Keys found full during one grant pass: taking slots only fills keys, so they stay full.
local full = nil
local function fits(p, alts)
  for i, alt in ipairs(alts) do
    local ok = true
    for _, kl in ipairs(alt) do
      if full and full[kl[1]] then ok = false; break end
      if count(p, kl[1]) >= kl[2] then
        if full then full[kl[1]] = true end
        ok = false; break
      end
    end
    if ok then return i end
  end
  return nil
end

local function take(p, alt, id, lease)
  for _, kl in ipairs(alt) do
    local k = p .. ':sl:h:' .. kl[1]
    redis.call('ZADD', k, now + lease, id)
    redis.call('PEXPIRE', k, lease + KEEP)
  end
end

-- Grant queued waiters in (priority, arrival) order; skip those still blocked.
local function grant_pass(p, grants)
  local q, w = p .. ':sl:q', p .. ':sl:w'
  local members = redis.call('ZRANGE', q, 0, -1)
  full = {}
  for _, m in ipairs(members) do
    local wid = string.sub(m, 18)
    local raw = redis.call('HGET', w, wid)
    if not raw then
      redis.call('ZREM', q, m)
    else
      local rec = cmsgpack.unpack(raw)  -- {node, expiry, lease, alts, member}
      if rec[2] < now then
        redis.call('ZREM', q, m); redis.call('HDEL', w, wid)
      else
        local i = fits(p, rec[4])
        if i then
          take(p, rec[4][i], wid, rec[3])
          redis.call('ZREM', q, m); redis.call('HDEL', w, wid)
          redis.call('SET', p .. ':sl:g:' .. wid, i - 1, 'PX', rec[3])
          redis.call('PUBLISH', p .. ':sl:wake:' .. rec[1], cmsgpack.pack({wid, i - 1}))
          grants[#grants + 1] = {wid, i - 1}
        end
      end
    end
  end
  full = nil
end

local function sweep_queue(p)
  local q, w = p .. ':sl:q', p .. ':sl:w'
  for _, m in ipairs(redis.call('ZRANGE', q, 0, -1)) do
    local wid = string.sub(m, 18)
    local raw = redis.call('HGET', w, wid)
    if not raw or cmsgpack.unpack(raw)[2] < now then
      redis.call('ZREM', q, m); redis.call('HDEL', w, wid)
    end
  end
end

-- Releases of one batch share one grant pass, run before the batch's next acquire (so a
-- newcomer never takes a slot a queued waiter could have had) or at its end.
local dirty, dirty_p, dirty_out = false, nil, nil
local function settle_releases()
  if dirty then
    grant_pass(dirty_p, dirty_out)
    dirty = false
  end
end

for _, op in ipairs(ops) do
  local code, p = op[1], op[2]
  local grants = {}
  freed = false
  if code ~= 2 then settle_releases() end
  if code == 1 then
    -- {1, p, id, node, lease, priority, queue_size, alts}
    local id, node, lease, prio, qsize, alts = op[3], op[4], op[5], op[6], op[7], op[8]
    for _, alt in ipairs(alts) do for _, kl in ipairs(alt) do count(p, kl[1]) end end
    if freed then grant_pass(p, grants) end
    local i = fits(p, alts)
    if i then
      take(p, alts[i], id, lease)
      out[#out + 1] = {1, i - 1, grants}
    elseif qsize <= 0 then
      out[#out + 1] = {0, 0, grants}
    else
      local q, w = p .. ':sl:q', p .. ':sl:w'
      if redis.call('ZCARD', q) >= qsize then sweep_queue(p) end
      if redis.call('ZCARD', q) >= qsize then
        out[#out + 1] = {0, 0, grants}
      else
        local seq = redis.call('INCR', p .. ':sl:seq')
        local member = string.format('%016d', seq) .. ':' .. id
        redis.call('ZADD', q, prio, member)
        redis.call('HSET', w, id, cmsgpack.pack({node, now + lease, lease, alts, member}))
        for _, k in ipairs({q, w, p .. ':sl:seq'}) do redis.call('PEXPIRE', k, lease + KEEP) end
        out[#out + 1] = {2, 0, grants}
      end
    end
  elseif code == 2 then
    -- {2, p, id, keys}
    for _, key in ipairs(op[4]) do redis.call('ZREM', p .. ':sl:h:' .. key, op[3]) end
    if dirty and dirty_p ~= p then settle_releases() end
    -- The grants of the shared pass are reported with the last release that ran it.
    dirty, dirty_p, dirty_out = true, p, grants
    out[#out + 1] = {grants}
  elseif code == 3 then
    -- {3, p, id}: 0 taken out of the queue; 1 it was granted meanwhile (index); -1 unknown
    local w = p .. ':sl:w'
    local raw = redis.call('HGET', w, op[3])
    if raw then
      redis.call('ZREM', p .. ':sl:q', cmsgpack.unpack(raw)[5]); redis.call('HDEL', w, op[3])
      out[#out + 1] = {0, 0}
    else
      local g = redis.call('GET', p .. ':sl:g:' .. op[3])
      if g then
        redis.call('DEL', p .. ':sl:g:' .. op[3])
        out[#out + 1] = {1, tonumber(g)}
      else
        out[#out + 1] = {-1, 0}
      end
    end
  else
    -- {4, p, lease, {{id, keys}...}, {id...}}: renew, report lost leases and missed grants
    local lease = op[3]
    local lost, got = {}, {}
    for _, h in ipairs(op[4]) do
      for _, key in ipairs(h[2]) do
        local k = p .. ':sl:h:' .. key
        if redis.call('ZSCORE', k, h[1]) then
          redis.call('ZADD', k, 'XX', now + lease, h[1]); redis.call('PEXPIRE', k, lease + KEEP)
        else
          lost[#lost + 1] = h[1]
        end
      end
    end
    local w = p .. ':sl:w'
    for _, id in ipairs(op[5]) do
      local raw = redis.call('HGET', w, id)
      if raw then
        local rec = cmsgpack.unpack(raw)
        rec[2] = now + lease
        redis.call('HSET', w, id, cmsgpack.pack(rec))
      else
        local g = redis.call('GET', p .. ':sl:g:' .. id)
        got[#got + 1] = {id, g and tonumber(g) or -1}
      end
    end
    if #op[5] > 0 then
      for _, k in ipairs({p .. ':sl:q', w, p .. ':sl:seq'}) do redis.call('PEXPIRE', k, lease + KEEP) end
    end
    grant_pass(p, grants)
    out[#out + 1] = {lost, got, grants}
  end
end
settle_releases()
return cmsgpack.pack(out)
"""

#: Local waiters whose queue place is gone without a grant get this index.
_LOST = -1


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[int]
    alternatives: Alternatives
    limited: list[list[list[Any]]]


class RedisSlots(Slots):
    name = "redis"

    def __init__(
        self,
        script: Script,
        bus: Bus,
        breaker: RedisBreaker,
        *,
        key_prefix: str = "hapax",
        cluster: str = "hapax",
        lease_seconds: float = 30.0,
        workers: int = 1,
        on_redis_failure: Literal["fail_open", "fail_closed"] = "fail_open",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.script = script
        self.bus = bus
        self.breaker = breaker
        self.prefix = f"{key_prefix}:{cluster}"
        self.node = os.urandom(6).hex()
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self.workers = max(1, workers)
        self.on_redis_failure = on_redis_failure
        self._clock = clock
        #: Used while Redis is down (fail_open): this process's share of every limit.
        self.local = SlotGate(queue_size=0, clock=clock)
        self._queue_size = 0
        self._limits: dict[str, int] = {}
        self._limited_cache: dict[Any, list[list[list[Any]]]] = {}
        self._ids = itertools.count(1)
        #: Slots this process holds in Redis: lease id → limited keys (renewed until released).
        self._held: dict[str, list[str]] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._background = Background("hapax-slot-leases")
        bus.listen(f"{self.prefix}:sl:wake:{self.node}", self._on_wake)
        bus.on_connect.append(self._reconcile)

    # -- config ------------------------------------------------------------------------

    def attach(
        self, *, on_wait: Callable[[float], None] | None, on_reject: Callable[[str], None] | None
    ) -> None:
        super().attach(on_wait=on_wait, on_reject=on_reject)
        self.local.attach(on_wait=on_wait, on_reject=on_reject)

    def configure(self, *, queue_size: int, limits: dict[str, int]) -> None:
        self._queue_size = queue_size
        self._limits = dict(limits)
        self._limited_cache.clear()
        n = self.workers
        self.local.configure(queue_size=max(0, queue_size // n) if queue_size else 0,
                             limits={k: max(1, v // n) for k, v in limits.items()})

    @property
    def waiting(self) -> int:
        return len(self._waiters) + self.local.waiting

    def _limited(self, alternatives: Alternatives) -> list[list[list[Any]]]:
        """Each alternative's limited keys with their limits, as the script takes them."""
        key = alternatives if isinstance(alternatives, tuple) else tuple(alternatives)
        c = self._limited_cache.get(key)
        if c is None:
            lim = self._limits
            c = [[[k, lim[k]] for k in alt if k in lim] for alt in alternatives]
            if len(self._limited_cache) > 4096:
                self._limited_cache.clear()
            self._limited_cache[key] = c
        return c

    # -- acquire -----------------------------------------------------------------------

    async def acquire(
        self, alternatives: Alternatives, *, priority: int, timeout: float, overloaded: Overloaded
    ) -> Slot:
        limited = self._limited(alternatives)
        if not limited[0]:
            # Nothing to share: the first choice has no limit anywhere.
            if self.on_wait is not None:
                self.on_wait(0.0)
            return Slot(self, tuple(alternatives[0]), 0, 0.0)
        if not self.breaker.allow():
            return await self._fallback(alternatives, priority, timeout, overloaded)
        wid = f"{self.node}{next(self._ids):x}"
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Registered before the call: a grant may be published before its reply arrives.
        self._waiters[wid] = _Waiter(fut, alternatives, limited)
        try:
            code, idx, grants = await self.script.call(
                [_ACQUIRE, self.prefix, wid, self.node, self._lease_ms, priority, self._queue_size, limited])
        except RedisUnavailable as exc:
            self._waiters.pop(wid, None)
            self.breaker.failed(exc)
            return await self._fallback(alternatives, priority, timeout, overloaded)
        except BaseException:
            self._waiters.pop(wid, None)
            raise
        self.breaker.ok()
        self._wake(grants)
        if code == 1:
            self._waiters.pop(wid, None)
            if self.on_wait is not None:
                self.on_wait(0.0)
            return self._slot(wid, alternatives, limited, idx, 0.0)
        if code == 0:
            self._waiters.pop(wid, None)
            if self.on_reject is not None:
                self.on_reject("queue_full")
            raise overloaded("queue_full", timeout)
        t0 = self._clock()
        try:
            async with asyncio.timeout(timeout):
                idx = await fut
        except TimeoutError:
            self._waiters.pop(wid, None)
            idx = await self._cancel(wid)
            if idx is None:
                if self.on_reject is not None:
                    self.on_reject("queue_timeout")
                raise overloaded("queue_timeout", timeout) from None
        except BaseException:
            # The client left: out of the queue, and a slot granted meanwhile goes back.
            self._waiters.pop(wid, None)
            self._background.spawn(self._leave(wid, alternatives, limited))
            raise
        self._waiters.pop(wid, None)
        if idx == _LOST:
            if self.on_reject is not None:
                self.on_reject("queue_timeout")
            raise overloaded("queue_timeout", timeout)
        waited = self._clock() - t0
        if self.on_wait is not None:
            self.on_wait(waited)
        return self._slot(wid, alternatives, limited, idx, waited)

    def _slot(self, wid: str, alternatives: Alternatives, limited: list[list[list[Any]]], idx: int,
              waited: float) -> Slot:
        keys = [k for k, _ in limited[idx]]
        if keys:
            self._held[wid] = keys
        return Slot(self, tuple(alternatives[idx]), idx, waited, handle=wid if keys else None)

    async def _cancel(self, wid: str) -> int | None:
        """Take ``wid`` out of the queue; the index it was granted meanwhile, if it was."""
        try:
            code, idx = await self.script.call([_CANCEL, self.prefix, wid])
        except RedisUnavailable as exc:
            self.breaker.failed(exc)
            return None  # its queue place and any grant expire with their leases
        return int(idx) if code == 1 else None

    async def _leave(self, wid: str, alternatives: Alternatives, limited: list[list[list[Any]]]) -> None:
        idx = await self._cancel(wid)
        if idx is not None:
            self._slot(wid, alternatives, limited, idx, 0.0).release()

    async def _fallback(
        self, alternatives: Alternatives, priority: int, timeout: float, overloaded: Overloaded
    ) -> Slot:
        if self.on_redis_failure == "fail_closed":
            raise RateLimited(
                "concurrency slots cannot be checked: the state store (Redis) is unavailable and "
                "state.on_redis_failure is fail_closed; retry shortly",
                param="state.on_redis_failure", retry_after=max(1.0, self.breaker.retry_interval),
                code="state_unavailable",
            )
        return await self.local.acquire(alternatives, priority=priority, timeout=timeout, overloaded=overloaded)

    # -- release and wake-ups ----------------------------------------------------------

    def _give_back(self, slot: Slot) -> None:
        wid = slot.handle
        if not isinstance(wid, str):
            return
        keys = self._held.pop(wid, None)
        if keys is not None:
            self._background.spawn(self._release(wid, keys))

    async def _release(self, wid: str, keys: list[str]) -> None:
        try:
            (grants,) = await self.script.call([_RELEASE, self.prefix, wid, keys])
        except RedisUnavailable as exc:
            self.breaker.failed(exc)  # the lease expires by itself
            return
        self._wake(grants)

    def _on_wake(self, data: bytes) -> None:
        wid, idx = msgpack.unpackb(data, raw=False)
        self._grant(wid, int(idx))

    def _wake(self, grants: list[Any]) -> None:
        for wid, idx in grants:
            self._grant(wid, int(idx))

    def _grant(self, wid: str, idx: int) -> None:
        w = self._waiters.get(wid)
        if w is not None and not w.future.done():
            w.future.set_result(idx)
        # No waiter: it left, and its cancel finds the grant and gives the slot back.

    # -- leases ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.script.load()
        except RedisUnavailable as exc:
            log.warning("redis not reachable at start-up for slots: %s", exc)
        self._background.start_renewer(self._renew_forever)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.renew()
            except Exception:  # renewal must outlive any one bad round
                log.exception("slot lease renewal failed")

    def _reconcile(self) -> None:
        if self._waiters or self._held:
            self._background.spawn(self.renew())

    async def renew(self) -> None:
        """Extend this process's leases, collect grants it missed, and sweep the dead's slots."""
        held = [[wid, keys] for wid, keys in self._held.items()]
        waiting = list(self._waiters)
        try:
            lost, got, grants = await self.script.call([_RENEW, self.prefix, self._lease_ms, held, waiting])
        except RedisUnavailable as exc:
            self.breaker.failed(exc)
            return
        self.breaker.ok()
        for wid in lost:
            if self._held.pop(wid, None) is not None:
                log.warning("a concurrency slot's lease was gone at renewal (Redis restarted, or a stalled loop)")
        for wid, idx in got:
            self._grant(wid, int(idx))
        self._wake(grants)

    def forget_leases(self) -> None:
        """Stop renewing without releasing: what a process that dies does (tests)."""
        self._held.clear()

    async def aclose(self) -> None:
        await self._background.aclose()
