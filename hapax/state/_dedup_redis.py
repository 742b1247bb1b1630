"""In-flight dedup across processes: identical concurrent requests on any node share one call.

Theory of operation: within a process, identical requests meet in a
``MemoryInFlight`` first, so only one of them (the local leader) talks to Redis.
It asks to lead the key for the cluster (``JOIN``: ``SET …:dd:l:<key> <node> NX
PX lease``). If it wins, it makes the call, renewing that lease every third of
``lease_seconds`` while the call runs, and when the call is done ``FINISH``
publishes the result, encoded by the caller's ``Codec``, on the channel of every
process that joined as a follower (``…:dd:f:<key>``, a set of process ids), and
drops the lease. If it loses, it joins the followers and waits for that message.

The question "who leads?" can be asked ahead of ``run`` (``claim``): the
pipeline asks it before awaiting the request's admission, so it shares that
round trip to Redis, and ``run`` takes the answer. A claim ``run`` never used (a
refused request) is given up as soon as its answer is in: a lead it took is
released at once (``FINISH`` with no result), so nobody waits out its lease.

A follower never waits on a dead leader for long: its wait is bounded by one
lease, after which it asks again; a leader that died (SIGKILL) stopped renewing,
its lease is gone, and the follower leads and makes the call itself. A leader
whose call fails, or was cancelled (its client hung up), publishes no result:
followers make the call themselves (the rare cost of a second upstream call, as
in the memory backend). Only the result crosses Redis, never the error: a
follower's own attempt reports its own.

Dedup is an optimisation, never a limit: with Redis unreachable (the shared
``RedisBreaker`` open, or a call failing) every process merges only its own
requests, whatever ``on_redis_failure`` says.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from ._background import Background
from ._batch import RedisUnavailable
from ._bus import Bus
from ._dedup import Codec, InFlight, MemoryInFlight
from ._script import RedisBreaker, Script

log = logging.getLogger("hapax.state")

T = TypeVar("T")

_JOIN, _FINISH, _RENEW = 1, 2, 3

DEDUP_LUA = r"""
local ops = cmsgpack.unpack(ARGV[1])
local out = {}
for _, op in ipairs(ops) do
  local code, p, node = op[1], op[2], op[3]
  if code == 1 then
    -- {1, p, node, key, lease_ms}: 1 lead, 0 follow
    local l, f = p .. ':dd:l:' .. op[4], p .. ':dd:f:' .. op[4]
    if redis.call('SET', l, node, 'NX', 'PX', op[5]) then
      out[#out + 1] = 1
    else
      redis.call('SADD', f, node)
      redis.call('PEXPIRE', f, op[5])
      out[#out + 1] = 0
    end
  elseif code == 2 then
    -- {2, p, node, key, result or nil}: tell every follower; end the lease if still ours
    local l, f = p .. ':dd:l:' .. op[4], p .. ':dd:f:' .. op[4]
    local msg = cmsgpack.pack({op[4], op[5]})
    local n = 0
    for _, peer in ipairs(redis.call('SMEMBERS', f)) do
      redis.call('PUBLISH', p .. ':dd:wake:' .. peer, msg)
      n = n + 1
    end
    redis.call('DEL', f)
    if redis.call('GET', l) == node then redis.call('DEL', l) end
    out[#out + 1] = n
  else
    -- {3, p, node, lease_ms, keys}: renew the leases this process still holds
    for _, key in ipairs(op[5]) do
      local l = p .. ':dd:l:' .. key
      if redis.call('GET', l) == node then redis.call('PEXPIRE', l, op[4]) end
    end
    out[#out + 1] = 0
  end
end
return cmsgpack.pack(out)
"""


@dataclass(slots=True, eq=False)
class _Claim:
    """A lead asked for ahead of ``run``: the join's reply, and where a leader's result lands."""

    key: str
    joined: asyncio.Future[Any]
    result: asyncio.Future[bytes | None]


class RedisInFlight(InFlight):
    claims = True

    def __init__(
        self,
        script: Script,
        bus: Bus,
        breaker: RedisBreaker,
        *,
        key_prefix: str = "hapax",
        cluster: str = "hapax",
        lease_seconds: float = 30.0,
    ) -> None:
        self.script = script
        self.breaker = breaker
        self.prefix = f"{key_prefix}:{cluster}"
        self.node = os.urandom(6).hex()
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self.local = MemoryInFlight()
        #: Keys this process leads for the cluster (leases renewed) and keys it follows.
        self._leading: set[str] = set()
        self._following: dict[str, asyncio.Future[bytes | None]] = {}
        #: Claims made ahead of ``run`` (``claim``): key -> the claim.
        self._claims: dict[str, _Claim] = {}
        self._background = Background("hapax-dedup-leases")
        #: Calls answered by another process's leader (tests, logs).
        self.shared_across = 0
        bus.listen(f"{self.prefix}:dd:wake:{self.node}", self._on_result)

    def __len__(self) -> int:
        return len(self.local)

    async def run(
        self, key: str, call: Callable[[], Awaitable[T]], codec: Codec[T] | None = None
    ) -> tuple[T, bool]:
        if codec is None:
            return await self.local.run(key, call)
        (result, remote), local = await self.local.run(key, lambda: self._cluster(key, call, codec))
        return result, remote or local

    def claim(self, key: str) -> object | None:
        # Only where run would ask Redis itself: not while this process already runs the key
        # (its request follows locally), nor twice, nor while the breaker keeps Redis out.
        if key in self.local or key in self._claims or key in self._following or not self.breaker.allow():
            return None
        c = self._claims[key] = _Claim(key, *self._join(key))
        c.joined.add_done_callback(self._settle_breaker)
        return c

    def unclaim(self, token: object | None) -> None:
        if not isinstance(token, _Claim) or self._claims.get(token.key) is not token:
            return  # no claim, or run used it
        del self._claims[token.key]
        token.joined.add_done_callback(lambda f: self._give_up(token, f))

    def _give_up(self, c: _Claim, joined: asyncio.Future[Any]) -> None:
        if self._following.get(c.key) is c.result:
            del self._following[c.key]
        if not joined.cancelled() and joined.exception() is None and joined.result() == 1:
            # A lead nobody will use: end it now (followers call themselves) rather than after a lease.
            self.script.call([_FINISH, self.prefix, self.node, c.key, None], on_error=self.breaker.failed)

    def _settle_breaker(self, joined: asyncio.Future[Any]) -> None:
        if joined.cancelled():
            return
        exc = joined.exception()
        if exc is None:
            self.breaker.ok()
        else:
            self.breaker.failed(exc)

    def _join(self, key: str) -> tuple[asyncio.Future[Any], asyncio.Future[bytes | None]]:
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        # Registered before joining: the leader may finish before the join's reply is read.
        self._following[key] = fut
        return self.script.call([_JOIN, self.prefix, self.node, key, self._lease_ms]), fut

    async def _cluster(self, key: str, call: Callable[[], Awaitable[T]], codec: Codec[T]) -> tuple[T, bool]:
        """One process's pass for ``key``: lead it for the cluster, or wait for whoever does."""
        claimed = self._claims.pop(key, None)
        while True:
            if claimed is not None:
                # Asked already, in the admission's round trip; its breaker verdict is taken.
                joined, fut = claimed.joined, claimed.result
                claimed = None
            else:
                if not self.breaker.allow():
                    return await call(), False
                joined, fut = self._join(key)
                joined.add_done_callback(self._settle_breaker)
            try:
                lead = await joined
            except RedisUnavailable:
                if self._following.get(key) is fut:
                    del self._following[key]
                return await call(), False
            except BaseException:
                if self._following.get(key) is fut:
                    del self._following[key]
                raise
            if lead == 1:
                if self._following.get(key) is fut:
                    del self._following[key]
                return await self._lead(key, call, codec), False
            try:
                async with asyncio.timeout(self.lease_seconds):
                    blob = await fut
            except TimeoutError:
                continue  # the leader may be dead: ask again (its lease expired, or we follow on)
            finally:
                if self._following.get(key) is fut:
                    del self._following[key]
            if blob is None:
                return await call(), False  # the leader's call failed or was abandoned
            try:
                result = codec.decode(blob)
            except ValueError:
                return await call(), False
            self.shared_across += 1
            return result, True

    async def _lead(self, key: str, call: Callable[[], Awaitable[T]], codec: Codec[T]) -> T:
        self._leading.add(key)
        blob: bytes | None = None
        try:
            result = await call()
            blob = codec.encode(result)
            return result
        finally:
            self._leading.discard(key)
            # Queued here, synchronously, awaited by nobody: followers must hear even if our
            # client left. If it fails, followers time out and call themselves; the lease expires.
            self.script.call([_FINISH, self.prefix, self.node, key, blob], on_error=self.breaker.failed)

    def _on_result(self, data: bytes) -> None:
        # raw: the result is bytes, which Lua hands on as a string of any bytes.
        key, blob = msgpack.unpackb(data, raw=True)
        fut = self._following.get(key.decode())
        if fut is not None and not fut.done():
            fut.set_result(blob)

    # -- leases ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.script.load()
        except RedisUnavailable as exc:
            log.warning("redis not reachable at start-up for dedup: %s", exc)
        self._background.start_renewer(self._renew_forever)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if self._leading:
                try:
                    await self.script.call([_RENEW, self.prefix, self.node, self._lease_ms, list(self._leading)])
                except RedisUnavailable as exc:
                    self.breaker.failed(exc)
                except Exception:  # renewal must outlive any one bad round
                    log.exception("dedup lease renewal failed")

    async def aclose(self) -> None:
        await self._background.aclose()
        await self.script.aclose()  # what the last leaders queued still reaches the followers
