"""The Redis backend: every node and worker with the same Redis and cluster name shares limits.

One reservation is one operation of the reserve script (``_scripts.RESERVE``),
atomic in Redis, so N processes admit exactly what one would. Concurrency slots
and budget reservations are leases of ``lease_seconds``: a background task
renews those of calls still running (every third of the lease), so a long
stream keeps its slot while a dead process's slots and reservations come back
within one lease. Operations of concurrent requests go out together
(``_batch.Batcher``), one pipeline per event-loop iteration.

Budget periods are named by this node's UTC wall clock (the day and month of
the keys); buckets and leases use Redis's own clock.

Settle and release are queued for the current batch and return at once: they
only correct a reservation already made, so a response does not wait a round
trip for them, and each write puts settles before reservations, so a call's
settle reaches Redis before any reservation queued after it. Nobody reads what
they return, so once the kept connection has answered a call they go out with
``CLIENT REPLY SKIP`` (``_batch.Batcher.submit``): no round trip of their own.
``aclose`` sends what is queued before it closes.

Errors: a call that fails or outlasts ``timeout`` raises ``StateUnavailable``
from ``reserve``; a failed settle or release is logged and dropped, since the
leases it would have ended expire by themselves.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._base import DONE, AccessState, Ask, Grant, RateView, Refusal, StateView
from ._batch import Batcher
from ._budget import BudgetScope, day_of, month_of, seconds_to_period_end
from ._ratelimit import Scope, tightest_headers
from ._scripts import RESERVE, SETTLE

log = logging.getLogger("hapax.state")

#: How long a slot or budget reservation outlives a process that stopped renewing it.
DEFAULT_LEASE_SECONDS = 30.0
#: A budget tally outlives its UTC day or month by this much, for nodes whose clocks lag.
_PERIOD_GRACE_MS = 3_600_000
# Settles go first in each pipeline: a call's settle always reaches Redis before any
# reservation queued after it (a client's next request never meets its own last slot).
_SETTLE, _RESERVE = 0, 1
_SETTLE_OP, _RELEASE_OP, _RENEW_OP = 1, 2, 3
_NO_CAP = -1


class RedisState(AccessState):
    name = "redis"

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "hapax",
        cluster: str = "hapax",
        timeout: float = 0.25,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = f"{key_prefix}:{cluster}"
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self._wall = wall_clock
        self.batch = Batcher(client, (SETTLE, RESERVE), timeout=timeout)
        # Grant ids: unique per process and across processes without a random draw per call.
        self._ids = itertools.count(1)
        self._id_base = os.urandom(6).hex()
        #: Grants holding leases (slots, budget reservations), renewed until they end.
        self._live: dict[str, Grant] = {}
        self._renewer: asyncio.Task[None] | None = None
        # Per scope, the script's view of it; rebuilt when the scope's limits object changes.
        self._rate_cache: dict[tuple[str, str], tuple[Any, list[Any], list[Any] | None]] = {}
        self._period_ends: dict[str, int] = {}
        self._budget_cache: dict[tuple[str, str], tuple[Any, str, str, list[Any], list[Any]]] = {}
        self.settle_failures = 0

    @classmethod
    def from_url(
        cls, url: str, *, password: str | None = None, tls_ca_file: str | None = None, timeout: float = 0.25,
        **kwargs: Any,
    ) -> RedisState:
        extra: dict[str, Any] = {}
        if password is not None:
            extra["password"] = password
        if tls_ca_file is not None:
            extra["ssl_ca_certs"] = tls_ca_file
        # One immediate retry (a connection gone stale across a Redis restart), no backoff:
        # redis-py's default backs off for seconds, and the failure policy must decide now.
        client = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0,
            retry=Retry(NoBackoff(), 1), **extra,
        )
        return cls(client, timeout=timeout, **kwargs)

    # -- the script's view of a scope ----------------------------------------------------

    def _rate(self, s: Scope) -> tuple[list[Any], list[Any] | None]:
        k = (s.kind, s.id)
        c = self._rate_cache.get(k)
        lim = s.limits
        if c is None or c[0] is not lim:
            base = f"{self.prefix}:rl:{s.kind}:{s.id}"
            entry = [base, lim.requests_per_minute or 0, lim.request_burst or 0,
                     lim.tokens_per_minute or 0, lim.concurrent or 0]
            # What settle needs: token correction and slot return; None when neither applies.
            settle = [base, lim.tokens_per_minute or 0, lim.concurrent or 0] \
                if (lim.tokens_per_minute or lim.concurrent) else None
            c = self._rate_cache[k] = (lim, entry, settle)
        return c[1], c[2]

    def _budget(self, b: BudgetScope, day: str, month: str) -> tuple[list[Any], list[Any]]:
        k = (b.kind, b.id)
        c = self._budget_cache.get(k)
        if c is not None and c[0] is b.budget and c[1] == day and c[2] == month:
            return c[3], c[4]
        base = f"{self.prefix}:bd:{b.kind}:{b.id}:"
        cap = b.budget
        d_end, m_end = self._period_end(day), self._period_end(month)
        entry = [base + day, base + month,
                 _cap(cap.daily_tokens), _cap(cap.monthly_tokens), _cap(cap.daily_usd), _cap(cap.monthly_usd),
                 d_end, m_end]
        settle = [base + day, base + month, d_end, m_end]
        if len(self._budget_cache) > 65536:
            self._budget_cache.clear()
        self._budget_cache[k] = (b.budget, day, month, entry, settle)
        return entry, settle

    def _period_end(self, period: str) -> int:
        """When a budget tally for ``period`` may expire, Unix ms by the wall clock."""
        end = self._period_ends.get(period)
        if end is None:
            if len(period) == 10:
                y, m, d = (int(x) for x in period.split("-"))
                start = calendar.timegm((y, m, d, 0, 0, 0, 0, 0, 0))
                end_s = start + 86400
            else:
                y, m = (int(x) for x in period.split("-"))
                y, m = (y + 1, 1) if m == 12 else (y, m + 1)
                end_s = calendar.timegm((y, m, 1, 0, 0, 0, 0, 0, 0))
            if len(self._period_ends) > 64:
                self._period_ends.clear()
            end = self._period_ends[period] = end_s * 1000 + _PERIOD_GRACE_MS
        return end

    def _headers(self, rate: tuple[Scope, ...], levels: list[list[float]]) -> dict[str, str]:
        # On every request: one pass for the tightest bucket of each kind, no lists built.
        rq: tuple[float, int, float] | None = None
        tk: tuple[float, int, float] | None = None
        for s, lv in zip(rate, levels, strict=True):
            lim = s.limits
            rpm = lim.requests_per_minute
            if rpm is not None and (rq is None or lv[0] < rq[0]):
                rq = (lv[0], rpm, lim.request_burst or rpm)
            tpm = lim.tokens_per_minute
            if tpm is not None and (tk is None or lv[1] < tk[0]):
                tk = (lv[1], tpm, tpm)
        return tightest_headers(
            [(rq[0], rq[1], max(0.0, (rq[2] - rq[0]) * 60.0 / rq[1]))] if rq else [],
            [(tk[0], tk[1], max(0.0, (tk[2] - tk[0]) * 60.0 / tk[1]))] if tk else [],
        )

    # -- the seam --------------------------------------------------------------------------

    async def reserve(self, ask: Ask) -> Grant | Refusal:
        wall = self._wall()
        day, month = day_of(wall), month_of(wall)
        rate_ops: list[Any] = []
        rate_settle: list[Any] = []
        for s in ask.rate:
            entry, settle = self._rate(s)
            rate_ops.append(entry)
            if settle is not None:
                rate_settle.append(settle)
        budget_ops: list[Any] = []
        budget_settle: list[Any] = []
        for b in ask.budget:
            entry, settle = self._budget(b, day, month)
            budget_ops.append(entry)
            budget_settle.append(settle)
        gid = f"{self._id_base}{next(self._ids):x}"
        res = await self.batch.submit(
            _RESERVE, [gid, self._lease_ms, ask.tokens, ask.usd, rate_ops, budget_ops, 1, int(wall * 1000)]
        )
        ok, pos, limit, retry_ms, used, levels, _ = res
        headers = self._headers(ask.rate, levels) if ask.rate else {}
        if ok != 1:
            return self._refusal(ask, pos, limit, retry_ms, used, headers, wall)
        grant = Grant(gid, ask, headers, day, month, handle=(rate_settle, budget_settle))
        if budget_settle or any(e[2] for e in rate_settle):
            self._live[gid] = grant
        return grant

    def _refusal(
        self, ask: Ask, pos: int, limit: str, retry_ms: float, used: float, headers: dict[str, str], wall: float
    ) -> Refusal:
        nb = len(ask.budget)
        if pos <= nb:
            b = ask.budget[pos - 1]
            cap = getattr(b.budget, limit)
            return Refusal(b, limit, cap, seconds_to_period_end("day" if limit.startswith("daily") else "month", wall),
                           used, headers)
        s = ask.rate[pos - nb - 1]
        value = {"concurrent": s.limits.concurrent, "requests_per_minute": s.limits.requests_per_minute,
                 "tokens_per_minute": s.limits.tokens_per_minute}[limit] or 0
        return Refusal(s, limit, value, retry_ms / 1000.0, 0.0, headers)

    def settle(self, grant: Grant, *, tokens: int, usd: float) -> Awaitable[None]:
        return self._end(grant, _SETTLE_OP, tokens, usd)

    def release(self, grant: Grant) -> Awaitable[None]:
        return self._end(grant, _RELEASE_OP, 0, 0.0)

    def _end(self, grant: Grant, kind: int, tokens: int, usd: float) -> Awaitable[None]:
        if grant.done:
            return DONE
        grant.done = True
        self._live.pop(grant.id, None)
        rate_settle, budget_settle = grant.handle
        ask = grant.ask
        if not budget_settle and not any(e[2] for e in rate_settle) and (tokens == ask.tokens or not rate_settle):
            return DONE  # nothing held and nothing to correct: requests-per-minute only
        # Queued for this loop iteration's batch and not waited for: a settle only corrects a
        # reservation already made, so the response need not wait a round trip for it.
        self.batch.submit(
            _SETTLE, [kind, grant.id, ask.tokens, ask.usd, tokens, usd, rate_settle, budget_settle, self._lease_ms,
                      int(self._wall() * 1000)],
            on_error=self._settle_failed,
        )
        return DONE

    def _settle_failed(self, exc: BaseException) -> None:
        # The leases it would have ended expire by themselves; a token correction is lost.
        self.settle_failures += 1
        log.debug("settle not recorded in redis: %s", exc)

    async def view(self, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...]) -> StateView:
        wall = self._wall()
        day, month = day_of(wall), month_of(wall)
        rate_ops = [self._rate(s)[0] for s in rate]
        budget_ops = [self._budget(b, day, month)[0] for b in budget]
        res = await self.batch.submit(
            _RESERVE, ["view", self._lease_ms, 0, 0.0, rate_ops, budget_ops, 0, int(wall * 1000)]
        )
        _, _, _, _, _, levels, bused = res
        views: dict[tuple[str, str], RateView] = {}
        for s, (rq, tk, n) in zip(rate, levels, strict=True):
            lim = s.limits
            rpm, tpm = lim.requests_per_minute, lim.tokens_per_minute
            views[(s.kind, s.id)] = RateView(
                requests_remaining=rq if rpm else None,
                requests_reset=max(0.0, ((lim.request_burst or rpm) - rq) * 60.0 / rpm) if rpm else 0.0,
                tokens_remaining=tk if tpm else None,
                tokens_reset=max(0.0, (tpm - tk) * 60.0 / tpm) if tpm else 0.0,
                in_flight=int(n),
            )
        used: dict[tuple[str, str, str], tuple[float, float]] = {}
        for b, (dt, du, mt, mu) in zip(budget, bused, strict=True):
            used[(b.kind, b.id, day)] = (dt, du)
            used[(b.kind, b.id, month)] = (mt, mu)
        return StateView(self._headers(rate, levels) if rate else {}, views, used)

    # -- leases ----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.batch.load()
        except Exception as exc:  # Redis may be down at start-up: the scripts load on first use
            log.warning("redis not reachable at start-up: %s", type(exc).__name__)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            self.renew()

    def renew(self) -> None:
        """Extend the leases of every grant still running by one lease from now."""
        for g in list(self._live.values()):
            rate_settle, budget_settle = g.handle
            self.batch.submit(
                _SETTLE, [_RENEW_OP, g.id, g.ask.tokens, g.ask.usd, 0, 0.0, rate_settle, budget_settle,
                          self._lease_ms, 0],
                on_error=_ignore,
            )

    def forget_leases(self) -> None:
        """Stop renewing without ending anything: what a process that dies does (tests)."""
        self._live.clear()

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        await self.batch.aclose()
        await self.client.aclose()

    async def keys(self) -> list[str]:
        """Every key of this cluster (tests and operators: what the layout looks like)."""
        out: list[str] = []
        async for k in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            out.append(k.decode() if isinstance(k, bytes) else str(k))
        return out

    async def raw(self, key: str) -> Any:
        """A msgpack value as stored (tests)."""
        v = await self.client.get(key)
        return msgpack.unpackb(v) if v is not None else None


def _cap(v: float | None) -> float:
    return _NO_CAP if v is None else v


def _ignore(exc: BaseException) -> None:
    """A renewal that failed: the next one, a third of a lease later, tries again."""

