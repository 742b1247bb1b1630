"""API keys shared through Redis: every node and worker of a cluster sees the same keys.

Theory of operation: the request path never waits on Redis for a known key.
Each process holds every key record in a local dict (``MemoryKeyStore``), loaded
at start and kept fresh three ways:

1. Every write (create, update, rotate, revoke) is one Lua script that stores
   the record, moves its hash index, bumps a version counter and publishes
   the record with that version. Subscribers apply what they receive at once.
2. A message whose version is not the next one means some were missed (a
   reconnect, a slow subscriber): the process reloads everything. Every
   ``RESYNC_INTERVAL`` seconds (on a ``TOUCH_FLUSH`` tick) it also compares
   the version in Redis with the one it holds, so a lost message costs at
   most that long.
3. A credential the local copy does not know gets one bounded Redis read
   before the 401 (a key made on another node a millisecond ago works at
   once). Concurrent misses share one pipeline per event-loop turn; a miss
   is remembered for ``NEGATIVE_TTL`` seconds (``NEGATIVE_MAX`` at most), and
   after a failed read misses skip Redis for ``DOWN_BACKOFF`` seconds, so a
   flood of bad keys is a handful of Redis calls, not one per request.

Writes are awaited with ``state.redis.timeout``; when Redis does not confirm
one the admin call fails with a 503 (``KeyStoreUnavailable``) and nothing is
kept locally: a key that exists on one node only would be worse than none.
A write carries a deadline on Redis's clock (the offset is measured with each
load and version check), so a hung Redis that takes it up late drops it
instead of applying a change the caller was told failed.

Last-used times are noted in memory and written as one ``HSET`` per
``TOUCH_FLUSH`` seconds; listings fold in every process's times first.

Keys, under ``P = {state.redis.key_prefix}:{state.cluster}``::

    P:keys:records   hash   key id -> record (JSON)
    P:keys:hashes    hash   SHA-256 of the secret -> key id
    P:keys:used      hash   key id -> last use, Unix seconds
    P:keys:version   string a counter bumped by every write
    P:keys:changes   pub/sub channel: {"v": version, "r": record}

None has a TTL: keys are data an operator made, revoked ones included (as in
the file store); they are bounded by the records admins create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from .._errors import KeyStoreUnavailable
from ..config import RedisConfig
from ._keys import KeyRecord, MemoryKeyStore
from ._redis_client import REDIS_FAILURES, connect, prefix

log = logging.getLogger("hapax.keys")

#: Seconds between checks of the version counter: the bound on a missed invalidation.
RESYNC_INTERVAL: Final = 5.0
#: Seconds between writes of last-used times.
TOUCH_FLUSH: Final = 1.0
#: Seconds a credential found nowhere is answered 401 without asking Redis again. A new key's
#: secret is 256 random bits, so it can never be in here before it exists.
NEGATIVE_TTL: Final = 2.0
#: Unknown credentials remembered at most; the oldest go first.
NEGATIVE_MAX: Final = 4096
#: Misses waiting for one lookup pipeline at most; past it a miss is a 401 without Redis.
MAX_PENDING: Final = 512
#: Seconds misses skip Redis after a lookup failed (Redis down must not cost each request a timeout).
DOWN_BACKOFF: Final = 1.0
#: Seconds between attempts to reconnect the subscriber.
RECONNECT_DELAY: Final = 0.5

# Store the record, move its hash index, bump the version and publish, atomically; unless
# Redis runs it after ARGV[5] (its own clock), when the client has given up and said 503.
# KEYS: records, hashes, version. ARGV: id, record JSON, hash, channel, deadline.
_PUT_LUA: Final = """
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1e6 > tonumber(ARGV[5]) then return -1 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local h = cjson.decode(old)['hash']
  if h ~= ARGV[3] then redis.call('HDEL', KEYS[2], h) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[4], '{"v":' .. v .. ',"r":' .. ARGV[2] .. '}')
return v
"""


class RedisKeyStore(MemoryKeyStore):
    """Keys in Redis, read from a local copy; see the module docstring."""

    def __init__(self, cfg: RedisConfig, *, cluster: str) -> None:
        super().__init__()
        self.cfg = cfg
        p = prefix(cfg, cluster) + ":keys"
        self.records_key, self.hashes_key = p + ":records", p + ":hashes"
        self.used_key, self.version_key, self.channel = p + ":used", p + ":version", p + ":changes"
        self._redis: Redis | None = None
        self._sub_redis: Redis | None = None
        #: Version of the last change applied; ``-1`` until the first load succeeded.
        self.version = -1
        self._negative: dict[str, float] = {}
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._down_until = 0.0
        self._touched: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lookups: set[asyncio.Task[None]] = set()
        self._reload_wanted = asyncio.Event()
        self._healthy = True
        self._put_script: Any = None
        #: Redis's clock minus ours, seconds; measured with every load and version check.
        self._clock_offset = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._redis = connect(self.cfg)
        self._sub_redis = connect(self.cfg, blocking_reads=True)
        self._put_script = self._redis.register_script(_PUT_LUA)
        # Subscribe before loading: a change made in between arrives as a message with a
        # version the load already holds, and is skipped; none falls in the gap.
        pubsub = await self._subscribe()
        await self._try_reload()
        self._tasks = [
            asyncio.create_task(self._listen(pubsub), name="keys-listen"),
            asyncio.create_task(self._maintain(), name="keys-maintain"),
        ]

    async def aclose(self) -> None:
        tasks = [*self._tasks, *self._lookups]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self._flush_touches()
        for client in (self._redis, self._sub_redis):
            if client is not None:
                with contextlib.suppress(*REDIS_FAILURES):
                    await client.aclose()

    def _client(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("RedisKeyStore used before start()")
        return self._redis

    # -- reads -------------------------------------------------------------------------

    async def fetch(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        seen = self._negative.get(digest)
        if (seen is not None and seen > now) or now < self._down_until or self._redis is None:
            return None
        fut = self._pending.get(digest)
        if fut is None:
            if len(self._pending) >= MAX_PENDING:
                return None
            loop = asyncio.get_running_loop()
            if not self._pending:
                # First miss of this turn: the lookup runs once the turn's other misses joined.
                loop.call_soon(self._start_lookup)
            fut = self._pending[digest] = loop.create_future()
        return await asyncio.shield(fut)

    def _start_lookup(self) -> None:
        batch, self._pending = self._pending, {}
        task = asyncio.create_task(self._lookup(batch))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _lookup(self, batch: dict[str, asyncio.Future[KeyRecord | None]]) -> None:
        try:
            await self._lookup_batch(batch)
        finally:  # cancelled at shutdown: no caller waits forever
            for fut in batch.values():
                if not fut.done():
                    fut.set_result(None)

    async def _lookup_batch(self, batch: dict[str, asyncio.Future[KeyRecord | None]]) -> None:
        found: dict[str, KeyRecord | None] = dict.fromkeys(batch)
        try:
            async with asyncio.timeout(self.cfg.timeout):
                digests = list(batch)
                ids = await self._client().hmget(self.hashes_key, digests)
                hits = [(d, i) for d, i in zip(digests, ids, strict=True) if i is not None]
                if hits:
                    async with self._client().pipeline(transaction=False) as pipe:
                        pipe.hmget(self.records_key, [i for _, i in hits])
                        pipe.hmget(self.used_key, [i for _, i in hits])
                        raw, used = await pipe.execute()
                    for (d, _), r, u in zip(hits, raw, used, strict=True):
                        if r is not None:
                            found[d] = _record(r, u)
        except REDIS_FAILURES as exc:
            self._down_until = time.monotonic() + DOWN_BACKOFF
            self._mark(False, exc)
            return
        now = time.monotonic()
        for d, rec in found.items():
            if rec is None:
                self._remember_unknown(d, now)
            elif rec.hash == d:
                self._apply(rec)
            fut = batch[d]
            if not fut.done():
                fut.set_result(rec if rec is not None and rec.hash == d else None)

    def _remember_unknown(self, digest: str, now: float) -> None:
        neg = self._negative
        if len(neg) >= NEGATIVE_MAX:
            for old in list(neg)[: NEGATIVE_MAX // 4]:  # the oldest quarter: dicts keep insertion order
                del neg[old]
        neg[digest] = now + NEGATIVE_TTL

    async def refreshed(self) -> None:
        """Fold in the last-used times every process wrote (a listing is rare; one HGETALL)."""
        await self._flush_touches()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                used = await self._client().hgetall(self.used_key)
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            return  # a listing with this process's times only beats a failed listing
        for k, v in used.items():
            key_id, t = _text(k), float(v)
            rec = self._by_id.get(key_id)
            if rec is not None and t > max(self._used.get(key_id, 0.0), rec.last_used_at or 0.0):
                self._used[key_id] = t

    # -- writes ------------------------------------------------------------------------

    def put(self, record: KeyRecord) -> None:
        raise RuntimeError("RedisKeyStore writes go through Redis: await save()")

    async def save(self, record: KeyRecord) -> None:
        data = record.model_dump_json().encode()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                applied = await self._put_script(
                    keys=[self.records_key, self.hashes_key, self.version_key],
                    args=[record.id, data, record.hash, self.channel, self._deadline()],
                )
                if applied == -1:
                    raise TimeoutError("Redis ran the write after its deadline and dropped it")
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            raise KeyStoreUnavailable(
                f"the key store (Redis) did not confirm the write within state.redis.timeout "
                f"({self.cfg.timeout:g} s); nothing was changed here, retry once Redis answers "
                f"({type(exc).__name__})"
            ) from exc
        # The version is left to our own message: taking it now could skip another node's
        # change published just before ours.
        self._apply(record)

    def touch(self, key_id: str, now: float) -> None:
        self._used[key_id] = now
        self._touched[key_id] = now

    async def _flush_touches(self) -> None:
        if not self._touched or self._redis is None:
            return
        touched, self._touched = self._touched, {}
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await self._redis.hset(self.used_key, mapping=touched)  # type: ignore[arg-type]
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            for k, t in touched.items():  # keep them for the next round, unless newer came
                self._touched.setdefault(k, t)

    # -- freshness ---------------------------------------------------------------------

    def _apply(self, rec: KeyRecord) -> None:
        MemoryKeyStore.put(self, rec)
        self._negative.pop(rec.hash, None)
        if self.on_change is not None:
            self.on_change()

    async def _try_reload(self) -> bool:
        try:
            await self._reload()
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            self._reload_wanted.set()
            return False
        self._mark(True)
        return True

    async def _reload(self) -> None:
        """Replace the local copy with Redis's, as of one version (a MULTI reads all at once)."""
        async with asyncio.timeout(max(self.cfg.timeout, 5.0)):  # a large store takes a moment to send
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.get(self.version_key)
                pipe.hgetall(self.records_key)
                pipe.hgetall(self.used_key)
                clock, version, raw, used = await pipe.execute()
        self._note_clock(clock)
        # Validating thousands of records is CPU work: off the event loop.
        records = await asyncio.to_thread(_records, raw, used)
        self._load(records)
        # The records carry every process's last-used times already; ``_used`` (folded into
        # them on each read) keeps only this process's newer ones, so a read stays cheap.
        self._used = dict(self._touched)
        self._negative.clear()
        snapshot = int(version or 0)
        self._reload_wanted.clear()
        if self.version > snapshot:
            # Messages newer than the snapshot came in while it was parsed, and it just
            # replaced them: take another one at once rather than wait for the version check.
            self._reload_wanted.set()
        self.version = snapshot
        if self.on_change is not None:
            self.on_change()

    async def _subscribe(self) -> PubSub | None:
        assert self._sub_redis is not None
        pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await pubsub.subscribe(self.channel)
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            await _close(pubsub)
            return None
        return pubsub

    async def _listen(self, pubsub: PubSub | None) -> None:
        try:
            while True:
                if pubsub is None:
                    await asyncio.sleep(RECONNECT_DELAY)
                    pubsub = await self._subscribe()
                    if pubsub is None:
                        continue
                    await self._try_reload()  # whatever was published while away is in Redis
                try:
                    msg = await pubsub.get_message(timeout=RESYNC_INTERVAL)
                except _SUB_FAILURES as exc:
                    self._mark(False, exc)
                    await _close(pubsub)
                    pubsub = None
                    continue
                if msg is not None and msg.get("type") == "message":
                    self._on_message(msg["data"])
        finally:
            if pubsub is not None:
                await _close(pubsub)

    def _on_message(self, data: bytes) -> None:
        try:
            doc = orjson.loads(data)
            v, rec = int(doc["v"]), KeyRecord.model_validate(doc["r"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed key-change message")
            self._reload_wanted.set()
            return
        if v <= self.version:
            return  # already in the copy (our own load, or an older change)
        if v != self.version + 1:
            self._reload_wanted.set()  # one or more were missed (or no load yet): reload everything
        self._apply(rec)
        self.version = v

    async def _maintain(self) -> None:
        """Write last-used times; every ``RESYNC_INTERVAL`` check nothing was missed."""
        last_check = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_wanted.wait(), TOUCH_FLUSH)
            await self._flush_touches()
            now = time.monotonic()
            if self._reload_wanted.is_set():
                if not await self._try_reload():
                    await asyncio.sleep(RECONNECT_DELAY)  # Redis is down: pace the retries
                last_check = now
            elif now - last_check >= RESYNC_INTERVAL:
                last_check = now
                try:
                    async with asyncio.timeout(self.cfg.timeout):
                        async with self._client().pipeline(transaction=False) as pipe:
                            pipe.time()
                            pipe.get(self.version_key)
                            clock, raw_v = await pipe.execute()
                    self._note_clock(clock)
                    v = int(raw_v or 0)
                except REDIS_FAILURES as exc:
                    self._mark(False, exc)
                    continue
                self._mark(True)
                if v != self.version:
                    await self._try_reload()

    def _note_clock(self, clock: tuple[int, int]) -> None:
        self._clock_offset = clock[0] + clock[1] / 1e6 - time.time()

    def _deadline(self) -> float:
        """When, on Redis's clock, a write still counts: half the timeout after sending, so the
        reply has the other half to come back. Past it the script changes nothing, so a write
        a hung Redis takes up late cannot land after the caller was told 503."""
        return time.time() + self._clock_offset + self.cfg.timeout / 2

    def _mark(self, healthy: bool, exc: BaseException | None = None) -> None:
        """One log line per transition, not per failed call."""
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("key store: Redis answers again; keys are in sync")
        else:
            log.warning(
                "key store: Redis is not answering; known keys keep working from the local copy, "
                "key writes fail with 503",
                extra={"fields": {"error": type(exc).__name__ if exc else None}},
            )


#: A subscriber's read fails with these; redis-py raises RuntimeError for a connection it dropped.
_SUB_FAILURES: Final[tuple[type[BaseException], ...]] = (*REDIS_FAILURES, RuntimeError)


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(*REDIS_FAILURES):
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _record(raw: bytes, used: bytes | None) -> KeyRecord:
    rec = KeyRecord.model_validate_json(raw)
    if used is not None:
        t = float(used)
        if rec.last_used_at is None or t > rec.last_used_at:
            rec = rec.model_copy(update={"last_used_at": t})
    return rec


def _records(raw: dict[bytes, bytes], used: dict[bytes, bytes]) -> list[KeyRecord]:
    return [_record(r, used.get(k)) for k, r in raw.items()]
