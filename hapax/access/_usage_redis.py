"""The usage ledger shared through Redis: ``/admin/usage`` on any node shows the cluster's totals.

Theory of operation: a process never writes Redis per request. Settled calls
and refusals add to a local ``UsageLedger`` of deltas (the same rows as the
file ledger: day, key, team, model, deployment); every ``usage.flush_interval``
seconds (1 by default with Redis) those deltas go to Redis as
``HINCRBY``/``HINCRBYFLOAT`` in one pipeline, and the local rows start again
from zero. A flush Redis does not confirm puts its deltas back, so an outage
delays usage but loses none (unless the process dies before Redis returns).
SIGTERM flushes what is pending. Reads (``query``) come from Redis, so they
lag each process's unflushed deltas by at most one interval. Budgets are not
enforced from here (the state seam reserves them); this is reporting.

Keys, under ``P = {state.redis.key_prefix}:{state.cluster}``::

    P:usage:days         sorted set  day (YYYY-MM-DD) scored by its Unix start
    P:usage:day:{day}    hash        '["key","team","model","deployment"]|counter' -> count

The counters are ``requests``, ``refused``, ``errors``, ``prompt_tokens``,
``completion_tokens``, ``cached_tokens`` (integers) and ``cost_usd`` (a float).
A day's hash expires ``usage.retention_days`` after the day ends; days older
than that leave the sorted set on every flush, which itself expires with the
last day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, date, datetime
from typing import Any, Final

import orjson
from redis.asyncio import Redis

from .._errors import UsageStoreUnavailable
from ..config import RedisConfig
from ._redis_client import REDIS_FAILURES, connect, prefix
from ._usage_ledger import RowKey, UsageLedger, UsageRow

log = logging.getLogger("hapax.usage")

_INT_FIELDS: Final = ("requests", "refused", "errors", "prompt_tokens", "completion_tokens", "cached_tokens")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _day_start(day: str) -> float:
    return datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC).timestamp()


class RedisUsage:
    """Local deltas flushed to Redis; reads of the cluster's rows from Redis."""

    def __init__(self, cfg: RedisConfig, *, cluster: str, retention_days: int, flush_interval: float) -> None:
        self.cfg = cfg
        p = prefix(cfg, cluster) + ":usage"
        self.days_key, self._day_prefix = p + ":days", p + ":day:"
        self.retention_days = retention_days
        self.interval = flush_interval
        #: Deltas since the last flush; the access layer records into it like into the file ledger.
        self.ledger = UsageLedger()
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._healthy = True

    async def start(self) -> None:
        self._redis = connect(self.cfg)
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def aclose(self) -> None:
        if self._task is not None:
            # Not cancelled: a flush cut mid-pipeline could not tell what Redis already counted.
            self._stop.set()
            await self._task
            self._task = None
        if self._redis is not None:
            await self.flush()
            if self.ledger.rows:
                log.error("usage: Redis did not take the last deltas before shutdown; they are lost",
                          extra={"fields": {"rows": len(self.ledger.rows)}})
            with contextlib.suppress(*REDIS_FAILURES):
                await self._redis.aclose()

    def configure(self, *, retention_days: int, flush_interval: float) -> None:
        self.retention_days = retention_days
        self.interval = flush_interval

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            await self.flush()

    async def flush(self) -> bool:
        """Send the pending deltas in one pipeline; ``False`` (deltas kept) if Redis did not take them."""
        rows = self.ledger.rows
        if not rows or self._redis is None:
            return True
        self.ledger.rows = {}
        self.ledger.take_changes()  # the file writer's bookkeeping: here the deltas go to Redis
        now = datetime.now(UTC).timestamp()
        keep = self.retention_days * 86400
        try:
            async with asyncio.timeout(self.cfg.timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    days: dict[str, float] = {}
                    for (day, key, team, model, dep), r in rows.items():
                        h = self._day_prefix + day
                        base = orjson.dumps([key, team, model, dep]) + b"|"
                        for name in _INT_FIELDS:
                            n = getattr(r, name)
                            if n:
                                pipe.hincrby(h, base + name.encode(), n)
                        if r.cost_usd:
                            pipe.hincrbyfloat(h, base + b"cost_usd", r.cost_usd)
                        days[day] = _day_start(day)
                    for day, start in days.items():
                        pipe.expireat(self._day_prefix + day, int(start + 86400 + keep))
                    pipe.zadd(self.days_key, days)
                    pipe.zremrangebyscore(self.days_key, "-inf", now - keep - 86400)
                    pipe.expireat(self.days_key, int(max(days.values()) + 86400 + keep))
                    await pipe.execute()
        except REDIS_FAILURES as exc:
            self._put_back(rows)
            self._mark(False, exc)
            return False
        self._mark(True)
        return True

    def _put_back(self, rows: dict[RowKey, UsageRow]) -> None:
        for k, r in rows.items():
            mine = self.ledger.rows.get(k)
            if mine is None:
                self.ledger.rows[k] = r
                continue
            for name in (*_INT_FIELDS, "cost_usd"):
                setattr(mine, name, getattr(mine, name) + getattr(r, name))

    async def query(self, **filters: Any) -> list[dict[str, Any]]:
        """Rows like ``UsageLedger.query`` (same filters), summed over every process's flushes."""
        since, until = filters.get("since"), filters.get("until")
        lo = _day_start(since) if since else "-inf"
        hi = _day_start(until) if until else "+inf"
        redis = self._redis
        if redis is None:
            raise RuntimeError("RedisUsage used before start()")
        try:
            async with asyncio.timeout(self.cfg.timeout):
                days = await redis.zrangebyscore(self.days_key, lo, hi)
                async with redis.pipeline(transaction=False) as pipe:
                    for d in days:
                        pipe.hgetall(self._day_prefix + _text(d))
                    hashes = await pipe.execute()
        except REDIS_FAILURES as exc:
            self._mark(False, exc)
            raise UsageStoreUnavailable(
                f"the usage store (Redis) did not answer within state.redis.timeout ({self.cfg.timeout:g} s); "
                f"retry once Redis answers ({type(exc).__name__})"
            ) from exc
        total = UsageLedger()
        for d, fields in zip(days, hashes, strict=True):
            day = _text(d)
            for f, v in fields.items():
                head, _, counter = f.rpartition(b"|")
                key, team, model, dep = orjson.loads(head)
                k = (day, key, team, model, dep)
                row = total.rows.get(k)
                if row is None:
                    row = total.rows[k] = UsageRow()
                name = counter.decode()
                if name == "cost_usd":
                    row.cost_usd = float(v)
                elif name in _INT_FIELDS:
                    setattr(row, name, int(v))
        return total.query(**filters)

    def _mark(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("usage: Redis answers again; pending usage flushed")
        else:
            log.warning("usage: Redis is not answering; usage is kept here and sent when it returns",
                        extra={"fields": {"error": type(exc).__name__ if exc else None,
                                          "pending_rows": len(self.ledger.rows)}})
