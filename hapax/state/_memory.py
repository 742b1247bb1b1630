"""The memory backend: one process's buckets, slots and budget tallies.

The embedded default (no Redis, no config). ``reserve`` checks the budgets and
the rate limits of every scope, then takes from all of them, with no ``await``
in between, so on one event loop it is atomic. The rules themselves live in
the pure ``RateLimiter`` and ``BudgetLedger``; this adapter only reads the
clocks (injected: monotonic for buckets, wall for calendar periods).

Slots here are not leases: they live and die with the process that holds them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from ._base import DONE, AccessState, Ask, Grant, RateView, Refusal, StateView
from ._budget import BudgetGrant, BudgetLedger, BudgetScope, day_of, month_of
from ._ratelimit import RateGrant, RateLimiter, Scope


class MemoryState(AccessState):
    name = "memory"

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._mono = monotonic
        self._wall = wall_clock
        self.limiter = RateLimiter()
        self.budgets = BudgetLedger()

    def reserve_now(self, ask: Ask) -> Grant | Refusal:
        """``reserve`` without the coroutine: the memory backend never waits."""
        mono = self._mono()
        if ask.budget:
            wall = self._wall()
            bd = self.budgets.check(ask.budget, ask.tokens, ask.usd, now=wall)
            if bd is not None:
                standing = self.limiter.headers(ask.rate, now=mono) if ask.rate else {}
                return Refusal(bd.scope, bd.limit, bd.cap, bd.retry_after, bd.used, standing)
        if ask.rate:
            rd = self.limiter.check(ask.rate, ask.tokens, now=mono)
            if rd is not None:
                return Refusal(rd.scope, rd.limit, rd.limit_value, rd.retry_after, 0.0, rd.headers)
        bgrant: BudgetGrant | None = None
        if ask.budget:
            bgrant = self.budgets.take(ask.budget, ask.tokens, ask.usd, now=wall)
            day, month = bgrant.day, bgrant.month
        else:
            wall = self._wall()
            day, month = day_of(wall), month_of(wall)
        rgrant: RateGrant | None = None
        headers = {}
        if ask.rate:
            self.limiter.take(ask.rate, ask.tokens, now=mono)
            headers = self.limiter.headers(ask.rate, now=mono)
            rgrant = RateGrant(ask.rate, ask.tokens, headers)
        return Grant("", ask, headers, day, month, handle=(rgrant, bgrant))

    async def reserve(self, ask: Ask) -> Grant | Refusal:
        return self.reserve_now(ask)

    def settle(self, grant: Grant, *, tokens: int, usd: float) -> Awaitable[None]:
        if grant.done:
            return DONE
        grant.done = True
        rgrant, bgrant = grant.handle
        if rgrant is not None:
            self.limiter.settle(rgrant, tokens, now=self._mono())
        if bgrant is not None:
            self.budgets.settle(bgrant, tokens, usd)
        return DONE

    def release(self, grant: Grant) -> Awaitable[None]:
        if grant.done:
            return DONE
        grant.done = True
        rgrant, bgrant = grant.handle
        if rgrant is not None:
            self.limiter.settle(rgrant, 0, now=self._mono())
        if bgrant is not None:
            self.budgets.release(bgrant)
        return DONE

    async def view(self, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...]) -> StateView:
        return self.view_now(rate, budget)

    def view_now(self, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...]) -> StateView:
        mono, wall = self._mono(), self._wall()
        views: dict[tuple[str, str], RateView] = {}
        for s in rate:
            req, tok = self.limiter.standing(s, now=mono)
            views[(s.kind, s.id)] = RateView(
                requests_remaining=req[0] if req else None, requests_reset=req[1] if req else 0.0,
                tokens_remaining=tok[0] if tok else None, tokens_reset=tok[1] if tok else 0.0,
                in_flight=self.limiter.in_flight(s),
            )
        used: dict[tuple[str, str, str], tuple[float, float]] = {}
        for b in budget:
            for period in (day_of(wall), month_of(wall)):
                used[(b.kind, b.id, period)] = self.budgets.used(b.kind, b.id, period)
        return StateView(self.limiter.headers(rate, now=mono) if rate else {}, views, used)

    def restore_spent(self, kind: str, id: str, period: str, tokens: float, usd: float) -> None:
        self.budgets.add_spent(kind, id, period, tokens, usd)

    def housekeeping(self, *, now: float) -> None:
        self.budgets.prune(now=now)

