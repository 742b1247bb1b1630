"""API keys in etcd: every node of a cluster serves the same keys from a watched local copy.

Theory of operation: each key record is one etcd key,
``/hapax/<cluster>/keys/<key_id>``, holding the record as JSON: the SHA-256 of
the secret and a short hint, never the secret (the record the file and Redis
stores keep). A ``PrefixWatch`` keeps a copy of every record under the prefix;
each batch it applies is folded into the ``MemoryKeyStore`` dicts that
authentication reads. So:

- Authentication never waits on etcd: ``by_hash`` is a dict read, and a miss
  is a 401 at once (``fetch`` asks nobody). A key made on another node is
  known here as soon as the watch delivers it (milliseconds); while etcd is
  unreachable every key known before keeps working, revoked ones stay revoked.
- A write (create, update, rotate, revoke) is one ``put`` bounded by
  ``cluster.etcd.timeout``. When etcd does not confirm it the admin call is a
  503 ``key_store_unavailable`` and nothing changes here. etcd has no deadline
  on a write, so one that timed out may still land: the message says to look
  before retrying (a create that landed is a key nobody holds the secret of;
  a revoke is safe to repeat).
- After the put, ``save`` waits (at most ``cluster.etcd.timeout``) for the
  watch to reach the put's revision, so what the caller does next through this
  node sees the write. Should the watch lag, the record is applied here anyway
  and kept over older views until the watch catches up: it is in etcd already.

Last-used times change on every call; writing them to etcd would send every
node a watch event per request. They go to Redis instead, to the hash the
Redis key store uses (``{key_prefix}:{cluster}:keys:used``), one ``HSET`` per
``TOUCH_FLUSH`` seconds, when the node has ``state.redis.url``; without Redis
each node knows its own. Usage and budgets are the usage store's, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Final

import aetcd
from pydantic import ValidationError
from redis.exceptions import RedisError

from hapax import KeyStoreUnavailable
from hapax.access import KeyRecord, MemoryKeyStore

from ._keys import keys_prefix
from ._watch import PrefixWatch

log = logging.getLogger("hapax.keys")

#: Seconds between writes of last-used times to Redis.
TOUCH_FLUSH: Final = 1.0
#: Seconds between attempts to load the keys when etcd did not answer at start.
RETRY_START: Final = 1.0

#: What an etcd call fails with: the client's errors (gRPC's translated), a socket's, our timeout.
ETCD_FAILURES: Final[tuple[type[BaseException], ...]] = (aetcd.ClientError, OSError, TimeoutError)
_REDIS_FAILURES: Final[tuple[type[BaseException], ...]] = (RedisError, OSError, TimeoutError)


class EtcdKeyStore(MemoryKeyStore):
    """Keys in etcd, read from a watched local copy; see the module docstring."""

    def __init__(
        self,
        client: aetcd.Client,
        *,
        cluster: str,
        timeout: float,
        redis: Any = None,
        used_key: str | None = None,
    ) -> None:
        """``client`` is the node's etcd client (not closed here); ``redis`` (a
        ``redis.asyncio.Redis``, not closed here either) and ``used_key`` hold last-used times."""
        super().__init__()
        self.client = client
        self.prefix = keys_prefix(cluster)
        self.timeout = timeout
        self._redis = redis
        self._used_key = used_key
        self._watch: PrefixWatch | None = None
        #: The raw value each record was parsed from: a batch re-parses only what changed.
        self._raw: dict[bytes, bytes] = {}
        #: Records written here that the watch has not delivered yet: (revision, record).
        self._ahead: dict[str, tuple[int, KeyRecord]] = {}
        #: ``save`` calls waiting for the watch to reach their revision.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._touched: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy = True

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load every key (bounded), then follow the watch. With etcd unreachable the node
        still starts, knowing no keys (401s), and keeps trying in the background."""
        if self._watch is not None:
            return  # ``load`` did it
        try:
            await self._start_watch()
        except ETCD_FAILURES as exc:
            self._mark(False, exc)
            self._tasks.append(asyncio.create_task(self._retry_start(), name="keys-etcd-start"))
        if self._redis is not None:
            self._tasks.append(asyncio.create_task(self._flush_loop(), name="keys-etcd-touch"))

    async def load(self) -> None:
        """Load every key now or raise ``KeyStoreUnavailable`` (the CLI: no keys, no answer)."""
        try:
            await self._start_watch()
        except ETCD_FAILURES as exc:
            raise KeyStoreUnavailable(
                f"cannot read the keys from etcd within cluster.etcd.timeout ({self.timeout:g} s): "
                f"is etcd up and reachable? ({type(exc).__name__})"
            ) from exc

    async def _start_watch(self) -> None:
        watch = PrefixWatch(self.client, self.prefix, on_change=self._on_view, timeout=self.timeout)
        await watch.start()
        self._watch = watch
        self._mark(True)

    async def _retry_start(self) -> None:
        while self._watch is None:
            await asyncio.sleep(RETRY_START)
            with contextlib.suppress(*ETCD_FAILURES):
                await self._start_watch()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._watch is not None:
            await self._watch.close()
        await self._flush_touches()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

    @property
    def connected(self) -> bool:
        """The watch is loaded and its stream is up."""
        return self._watch is not None and self._watch.connected

    @property
    def revision(self) -> int:
        """The etcd revision the local copy is at (0 before the first load)."""
        return self._watch.revision if self._watch is not None else 0

    # -- the watched copy --------------------------------------------------------------

    def _on_view(self, view: Mapping[bytes, bytes], revision: int) -> None:
        """Fold a batch into the copy: parse only what changed, drop what is gone."""
        changed = False
        for k in [k for k in self._raw if k not in view]:
            del self._raw[k]
            key_id = k[len(self.prefix):].decode(errors="replace")
            rec = self._by_id.pop(key_id, None)
            if rec is not None:
                self._by_hash.pop(rec.hash, None)
            changed = True
        for k, raw in view.items():
            if self._raw.get(k) == raw:
                continue
            self._raw[k] = raw
            try:
                rec = KeyRecord.model_validate_json(raw)
            except ValidationError:
                # Someone wrote by hand under the prefix; never a reason to stop serving the rest.
                log.warning("ignored a malformed key record in etcd",
                            extra={"fields": {"key": k.decode(errors="replace")}})
                continue
            MemoryKeyStore.put(self, rec)
            changed = True
        for key_id, (rev, rec) in list(self._ahead.items()):
            if revision >= rev:
                del self._ahead[key_id]
            else:  # our own write, newer than this view: keep it in force
                MemoryKeyStore.put(self, rec)
        self._wake(revision)
        if changed and self.on_change is not None:
            self.on_change()

    def _wake(self, revision: int) -> None:
        keep = []
        for rev, fut in self._waiters:
            if rev <= revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((rev, fut))
        self._waiters = keep

    # -- writes ------------------------------------------------------------------------

    def put(self, record: KeyRecord) -> None:
        raise RuntimeError("EtcdKeyStore writes go through etcd: await save()")

    async def save(self, record: KeyRecord) -> None:
        key = self.prefix + record.id.encode()
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self.client.put(key, record.model_dump_json().encode())
        except ETCD_FAILURES as exc:
            self._mark(False, exc)
            raise KeyStoreUnavailable(
                f"the key store (etcd) did not confirm the write within cluster.etcd.timeout "
                f"({self.timeout:g} s); it may still be applied: check the key "
                f"(GET /admin/keys/{record.id}) before retrying ({type(exc).__name__})"
            ) from exc
        self._mark(True)
        rev = resp.header.revision
        if self.revision < rev:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((rev, fut))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await fut
        if self.revision < rev:
            # The watch lags (or is down): the record is in etcd, so it is in force here now.
            self._ahead[record.id] = (rev, record)
            MemoryKeyStore.put(self, record)
            if self.on_change is not None:
                self.on_change()

    # -- last-used times ---------------------------------------------------------------

    def touch(self, key_id: str, now: float) -> None:
        self._used[key_id] = now
        if self._redis is not None:
            self._touched[key_id] = now

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_FLUSH)
            await self._flush_touches()

    async def _flush_touches(self) -> None:
        if not self._touched or self._redis is None:
            return
        touched, self._touched = self._touched, {}
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis.hset(self._used_key, mapping=touched)
        except _REDIS_FAILURES:  # Redis down: keep them for the next round, unless newer came
            for k, t in touched.items():
                self._touched.setdefault(k, t)

    async def refreshed(self) -> None:
        """Fold in the last-used times every node wrote (a listing is rare; one HGETALL)."""
        if self._redis is None:
            return
        await self._flush_touches()
        try:
            async with asyncio.timeout(self.timeout):
                used = await self._redis.hgetall(self._used_key)
        except _REDIS_FAILURES:
            return  # a listing with this node's times only beats a failed listing
        for k, v in used.items():
            key_id, t = k.decode() if isinstance(k, bytes) else k, float(v)
            rec = self._by_id.get(key_id)
            if rec is not None and t > max(self._used.get(key_id, 0.0), rec.last_used_at or 0.0):
                self._used[key_id] = t

    def _mark(self, healthy: bool, exc: BaseException | None = None) -> None:
        """One log line per transition, not per failed call."""
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("key store: etcd answers again; keys are in sync")
        else:
            log.warning(
                "key store: etcd is not answering; known keys keep working from the local copy, "
                "key writes fail with 503",
                extra={"fields": {"error": type(exc).__name__ if exc else None}},
            )
