"""Token quotas and USD budgets per UTC day and month: reserve, then settle.

Theory of operation: each scope (a key, a team) may cap tokens and dollars
per UTC calendar day and month. For every (scope, period) the ledger keeps
what was ``spent`` (settled calls) and what is ``reserved`` (calls in flight).

- ``reserve`` admits a call only if, for every cap that applies,
  ``spent + reserved + estimate <= cap``; then it adds the estimate to
  ``reserved`` everywhere at once. A cap already reached refuses even a call
  estimated at zero.
- ``settle`` moves the call from ``reserved`` to ``spent`` at its real size.
- ``release`` drops a reservation whose call never ran.

So with any number of concurrent calls, spend passes a cap only by what the
calls in flight used beyond their estimates; with ``max_tokens`` set the
estimate is an upper bound and the cap holds exactly.

A call counts in the day and month it was admitted in. Pure: time comes in
as ``now`` (Unix seconds, wall clock, since periods are calendar dates).
"""

from __future__ import annotations

import calendar
import functools
import time
from dataclasses import dataclass, field

from ..config import Budget

#: (cap name, period kind, measure): measure 0 is tokens, 1 is USD.
_CAPS = (
    ("daily_tokens", "day", 0),
    ("monthly_tokens", "month", 0),
    ("daily_usd", "day", 1),
    ("monthly_usd", "month", 1),
)


@functools.lru_cache(maxsize=4)
def _day(epoch_day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch_day * 86400))


def day_of(now: float) -> str:
    # Called on every request; the UTC day changes once a day, so format it once.
    return _day(int(now // 86400))


def month_of(now: float) -> str:
    return day_of(now)[:7]


def seconds_to_period_end(period: str, now: float) -> float:
    t = time.gmtime(now)
    if period == "day":
        return 86400 - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now


@dataclass(frozen=True, slots=True)
class BudgetScope:
    kind: str
    id: str
    budget: Budget

    @property
    def label(self) -> str:
        return f"{self.kind} {self.id!r}"


@dataclass(frozen=True, slots=True)
class BudgetDenied:
    scope: BudgetScope
    #: daily_tokens, monthly_tokens, daily_usd or monthly_usd.
    limit: str
    cap: float
    used: float
    retry_after: float


@dataclass(slots=True)
class BudgetGrant:
    scopes: tuple[BudgetScope, ...]
    day: str
    month: str
    tokens: int
    usd: float
    done: bool = False


@dataclass(slots=True)
class _Tally:
    spent: list[float] = field(default_factory=lambda: [0.0, 0.0])
    reserved: list[float] = field(default_factory=lambda: [0.0, 0.0])


class BudgetLedger:
    def __init__(self) -> None:
        self._t: dict[tuple[str, str, str], _Tally] = {}

    def _tally(self, kind: str, id: str, period: str) -> _Tally:
        k = (kind, id, period)
        t = self._t.get(k)
        if t is None:
            t = self._t[k] = _Tally()
        return t

    def used(self, kind: str, id: str, period: str) -> tuple[float, float]:
        """(tokens, usd) spent plus reserved."""
        t = self._t.get((kind, id, period))
        if t is None:
            return (0.0, 0.0)
        return (t.spent[0] + t.reserved[0], t.spent[1] + t.reserved[1])

    def add_spent(self, kind: str, id: str, period: str, tokens: float, usd: float) -> None:
        t = self._tally(kind, id, period)
        t.spent[0] += tokens
        t.spent[1] += usd

    def reserve(
        self, scopes: tuple[BudgetScope, ...], tokens: int, usd: float, *, now: float
    ) -> BudgetGrant | BudgetDenied:
        denied = self.check(scopes, tokens, usd, now=now)
        if denied is not None:
            return denied
        return self.take(scopes, tokens, usd, now=now)

    def check(self, scopes: tuple[BudgetScope, ...], tokens: int, usd: float, *, now: float) -> BudgetDenied | None:
        """The first cap a call estimated at ``tokens`` and ``usd`` would pass; ``None`` if none."""
        day, month = day_of(now), month_of(now)
        est = (float(tokens), usd)
        for s in scopes:
            b = s.budget
            for name, period, measure in _CAPS:
                cap = getattr(b, name)
                if cap is None:
                    continue
                used = self.used(s.kind, s.id, day if period == "day" else month)[measure]
                if used >= cap or used + est[measure] > cap:
                    return BudgetDenied(s, name, cap, used, seconds_to_period_end(period, now))
        return None

    def take(self, scopes: tuple[BudgetScope, ...], tokens: int, usd: float, *, now: float) -> BudgetGrant:
        """Reserve the estimate in every scope's day and month; only after ``check`` passed."""
        day, month = day_of(now), month_of(now)
        for s in scopes:
            for period in (day, month):
                t = self._tally(s.kind, s.id, period)
                t.reserved[0] += tokens
                t.reserved[1] += usd
        return BudgetGrant(scopes, day, month, tokens, usd)

    def _unreserve(self, grant: BudgetGrant) -> None:
        for s in grant.scopes:
            for period in (grant.day, grant.month):
                t = self._tally(s.kind, s.id, period)
                t.reserved[0] = max(0.0, t.reserved[0] - grant.tokens)
                t.reserved[1] = max(0.0, t.reserved[1] - grant.usd)

    def release(self, grant: BudgetGrant) -> None:
        if not grant.done:
            grant.done = True
            self._unreserve(grant)

    def settle(self, grant: BudgetGrant, tokens: int, usd: float) -> None:
        if grant.done:
            return
        grant.done = True
        self._unreserve(grant)
        for s in grant.scopes:
            for period in (grant.day, grant.month):
                self.add_spent(s.kind, s.id, period, tokens, usd)

    def prune(self, *, now: float) -> None:
        """Forget periods that can no longer be charged (before this month and today)."""
        keep = {day_of(now), month_of(now)}
        for k in [k for k in self._t if k[2] not in keep]:
            t = self._t[k]
            if not (t.reserved[0] or t.reserved[1]):
                del self._t[k]
