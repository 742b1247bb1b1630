"""Redis failure as a policy: a breaker around the shared state, and a local fallback.

Theory of operation: while Redis answers, every reservation goes to it. The first
that fails (an error, or no answer within ``state.redis.timeout``) opens the
breaker: the node is *degraded* (one warning, ``hapax_degraded{dependency="redis"}``
at 1) and for ``retry_interval`` seconds no request waits on Redis at all. Each
request is then decided by its ``on_failure`` policy (``Ask.on_failure``):

- ``fail_open``: checked against local limits, each shared limit divided by the
  number of live workers, so N workers together still admit about the shared limit;
- ``fail_closed``: refused (429 ``state_unavailable``), nothing taken.

After ``retry_interval`` one request probes Redis (the others stay local). If it
answers, the breaker closes (one info line, the gauge back to 0) and every request
is shared again: no restart, and the request that probed is answered like any
other. A grant ends where it was made: local grants settle locally; a shared grant
whose settle cannot reach Redis leaves leases that expire by themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Budget, RateLimits
from ._base import AccessState, Ask, Grant, Refusal, StateUnavailable, StateView
from ._budget import BudgetScope
from ._memory import MemoryState
from ._ratelimit import Scope
from ._redis import RedisState

log = logging.getLogger("hapax.state")

#: Seconds between probes of a Redis found down: a dead Redis costs one request's
#: timeout per interval, not every request's.
DEFAULT_RETRY_INTERVAL = 1.0


class FailoverState(AccessState):
    name = "redis"

    def __init__(
        self,
        shared: RedisState,
        *,
        workers: int = 1,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        on_change: Callable[[bool], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.shared = shared
        self.local = MemoryState(monotonic=monotonic, wall_clock=wall_clock)
        self.workers = max(1, workers)
        self.retry_interval = retry_interval
        #: Called with True when Redis is found down, False when it is back.
        self.on_change = on_change
        self._mono = monotonic
        self.degraded = False
        self._retry_at = 0.0
        self._probing = False
        self._divided: dict[int, tuple[Any, Any]] = {}

    async def reserve(self, ask: Ask) -> Grant | Refusal:
        if not self.degraded:
            try:
                return await self.shared.reserve(ask)
            except StateUnavailable as exc:
                self._down(exc)
                return self._fallback(ask)
        now = self._mono()
        if self._probing or now < self._retry_at:
            return self._fallback(ask)
        self._probing = True
        try:
            r = await self.shared.reserve(ask)
        except StateUnavailable:
            self._retry_at = self._mono() + self.retry_interval
            return self._fallback(ask)
        finally:
            self._probing = False
        self._up()
        return r

    def _down(self, exc: StateUnavailable) -> None:
        if self.degraded:
            return
        self.degraded = True
        self._retry_at = self._mono() + self.retry_interval
        log.warning(
            "redis unavailable (%s): limits fall back to each scope's on_redis_failure policy "
            "(fail_open: local limits / %d workers; fail_closed: 429 state_unavailable)",
            exc, self.workers,
        )
        if self.on_change is not None:
            self.on_change(True)

    def _up(self) -> None:
        self.degraded = False
        log.info("redis reachable again: limits are shared again")
        if self.on_change is not None:
            self.on_change(False)

    def _fallback(self, ask: Ask) -> Grant | Refusal:
        if ask.on_failure == "fail_closed":
            return Refusal(None, "state_unavailable", 0, self.retry_interval)
        return self.local.reserve_now(self._local_ask(ask))

    def _local_ask(self, ask: Ask) -> Ask:
        if self.workers == 1:
            return ask
        rate = tuple(Scope(s.kind, s.id, self._divide(s.limits)) for s in ask.rate)
        budget = tuple(BudgetScope(b.kind, b.id, self._divide(b.budget)) for b in ask.budget)
        return Ask(rate, budget, ask.tokens, ask.usd, ask.on_failure)

    def _divide(self, limits: Any) -> Any:
        """``limits`` with every figure divided by the worker count (at least 1 request)."""
        c = self._divided.get(id(limits))
        if c is not None and c[0] is limits:
            return c[1]
        n = self.workers
        out: RateLimits | Budget
        if isinstance(limits, RateLimits):
            out = limits.model_copy(update={
                k: max(1, v // n) for k in ("requests_per_minute", "request_burst", "tokens_per_minute", "concurrent")
                if (v := getattr(limits, k)) is not None
            })
        else:
            assert isinstance(limits, Budget)
            out = limits.model_copy(update={
                k: v / n if isinstance(v, float) else v // n
                for k in ("daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd")
                if (v := getattr(limits, k)) is not None
            })
        if len(self._divided) > 4096:
            self._divided.clear()
        self._divided[id(limits)] = (limits, out)
        return out

    def settle(self, grant: Grant, *, tokens: int, usd: float) -> Awaitable[None]:
        if not grant.id:  # made by the local fallback
            return self.local.settle(grant, tokens=tokens, usd=usd)
        return self.shared.settle(grant, tokens=tokens, usd=usd)

    def release(self, grant: Grant) -> Awaitable[None]:
        if not grant.id:
            return self.local.release(grant)
        return self.shared.release(grant)

    async def view(self, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...]) -> StateView:
        if not self.degraded:
            try:
                return await self.shared.view(rate, budget)
            except StateUnavailable as exc:
                self._down(exc)
        return self.local.view_now(rate, budget)

    def housekeeping(self, *, now: float) -> None:
        self.local.housekeeping(now=now)

    async def start(self) -> None:
        await self.shared.start()

    async def aclose(self) -> None:
        await self.shared.aclose()
