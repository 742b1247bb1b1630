"""The contract every access-state backend keeps, run against memory and a real Redis.

Memory runs on an injected clock; Redis keeps its own (``TIME`` inside the
scripts), so where a test needs time to pass, ``elapse`` advances the fake clock
or, on Redis, polls Redis's clock until that much has passed. Budget periods are
named by the wall clock, injected on both.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from hapax.config import Budget, RateLimits
from hapax.state import (
    AccessState,
    Ask,
    BudgetScope,
    Grant,
    MemoryState,
    RedisState,
    Refusal,
    Scope,
    StateUnavailable,
)

NOON = calendar.timegm((2026, 6, 15, 12, 0, 0, 0, 0, 0))


@dataclass
class Clock:
    mono: float = 1000.0
    wall: float = NOON


@dataclass
class Env:
    kind: str
    url: str = ""
    clock: Clock = field(default_factory=Clock)
    made: list[AccessState] = field(default_factory=list)
    _memory: dict[str, MemoryState] = field(default_factory=dict)

    async def make(self, cluster: str = "c1", *, lease: float = 30.0) -> AccessState:
        """A backend for one process of ``cluster``: on memory, the one process there is."""
        if self.kind == "memory":
            m = self._memory.get(cluster)
            if m is None:
                m = self._memory[cluster] = MemoryState(monotonic=lambda: self.clock.mono,
                                                        wall_clock=lambda: self.clock.wall)
            return m
        r = RedisState.from_url(self.url, cluster=cluster, lease_seconds=lease, timeout=2.0,
                                wall_clock=lambda: self.clock.wall)
        await r.start()
        self.made.append(r)
        return r

    async def elapse(self, seconds: float) -> None:
        self.clock.wall += seconds
        if self.kind == "memory":
            self.clock.mono += seconds
            return
        r = self.made[0]
        assert isinstance(r, RedisState)
        start = await _redis_now(r)
        deadline = time.monotonic() + seconds + 5
        while await _redis_now(r) < start + seconds:  # bounded poll of Redis's own clock
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


async def _redis_now(r: RedisState) -> float:
    s, us = await r.client.time()
    return float(s) + us / 1e6


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        e = Env("redis", url)
    else:
        e = Env("memory")
    try:
        yield e
    finally:
        for m in e.made:
            await m.aclose()


@pytest.fixture
async def redis_env(redis_url: str) -> AsyncIterator[Env]:
    e = Env("redis", redis_url)
    try:
        yield e
    finally:
        for m in e.made:
            await m.aclose()


def key(limits: RateLimits, id: str = "k1") -> Scope:
    return Scope("key", id, limits)


def grant(r: Grant | Refusal) -> Grant:
    assert isinstance(r, Grant), r
    return r


def refusal(r: Grant | Refusal) -> Refusal:
    assert isinstance(r, Refusal), r
    return r


# -- requests per minute ---------------------------------------------------------------


async def test_requests_per_minute_admits_the_burst_then_refuses_until_refilled(env: Env) -> None:
    st = await env.make()
    ask = Ask((key(RateLimits(requests_per_minute=600, request_burst=3)),))
    for _ in range(3):
        grant(await st.reserve(ask))
    r = refusal(await st.reserve(ask))
    assert (r.limit, r.value) == ("requests_per_minute", 600)
    assert 0 < r.retry_after <= 0.1 + 1e-6  # 600/min is one every 0.1 s
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    await env.elapse(0.1)
    g = grant(await st.reserve(ask))
    assert g.headers["x-ratelimit-limit-requests"] == "600"


# -- tokens per minute -----------------------------------------------------------------


async def test_tokens_per_minute_debt_and_an_oversize_call_on_a_full_bucket(env: Env) -> None:
    st = await env.make()
    s = key(RateLimits(tokens_per_minute=1000))
    big = grant(await st.reserve(Ask((s,), tokens=2500)))  # more than the bucket holds: passes when full
    assert big.headers["x-ratelimit-remaining-tokens"] == "0"
    r = refusal(await st.reserve(Ask((s,), tokens=1)))
    assert r.limit == "tokens_per_minute" and r.retry_after > 60  # 1,500 of debt to refill first
    await st.settle(big, tokens=2500, usd=0.0)
    v = await st.view((s,), ())
    level = v.rate[("key", "k1")].tokens_remaining
    assert level is not None and -1500 - 1 < level < -1400  # still in debt, refilling


async def test_settle_corrects_tokens_by_actual_minus_estimate(env: Env) -> None:
    st = await env.make()
    s = key(RateLimits(tokens_per_minute=1000))
    g = grant(await st.reserve(Ask((s,), tokens=400)))
    await st.settle(g, tokens=100, usd=0.0)  # used 300 fewer than reserved: refunded
    v = await st.view((s,), ())
    assert v.headers["x-ratelimit-remaining-tokens"] == "900"
    g = grant(await st.reserve(Ask((s,), tokens=100)))
    await st.settle(g, tokens=600, usd=0.0)  # used 500 more: a debt later callers wait out
    v = await st.view((s,), ())
    assert v.headers["x-ratelimit-remaining-tokens"] in ("300", "301")


# -- concurrency -----------------------------------------------------------------------


async def test_concurrency_slots_come_back_on_settle_and_release(env: Env) -> None:
    st = await env.make()
    ask = Ask((key(RateLimits(concurrent=2)),))
    a, b = grant(await st.reserve(ask)), grant(await st.reserve(ask))
    r = refusal(await st.reserve(ask))
    assert (r.limit, r.value, r.retry_after) == ("concurrent", 2, 1.0)
    await st.settle(a, tokens=0, usd=0.0)
    c = grant(await st.reserve(ask))
    refusal(await st.reserve(ask))
    await st.release(b)
    grant(await st.reserve(ask))
    v = await st.view(ask.rate, ())
    assert v.rate[("key", "k1")].in_flight == 2
    await st.release(c)
    v = await st.view(ask.rate, ())
    assert v.rate[("key", "k1")].in_flight == 1


# -- budgets ---------------------------------------------------------------------------


async def test_budget_admits_while_spent_plus_reserved_plus_estimate_fits(env: Env) -> None:
    st = await env.make()
    b = BudgetScope("team", "t", Budget(daily_tokens=1000))
    a = grant(await st.reserve(Ask(budget=(b,), tokens=600)))
    r = refusal(await st.reserve(Ask(budget=(b,), tokens=500)))  # 600 reserved + 500 > 1000
    assert (r.limit, r.value, r.used) == ("daily_tokens", 1000, 600)
    assert r.retry_after == pytest.approx(12 * 3600)  # until the UTC day ends
    grant(await st.reserve(Ask(budget=(b,), tokens=400)))  # exactly to the cap
    await st.settle(a, tokens=100, usd=0.0)  # spent 100, not 600
    v = await st.view((), (b,))
    assert v.used[("team", "t", "2026-06-15")][0] == 500  # 100 spent + 400 reserved


async def test_a_reached_cap_refuses_even_a_zero_estimate_and_usd_caps_hold(env: Env) -> None:
    st = await env.make()
    b = BudgetScope("key", "k", Budget(monthly_usd=1.0))
    g = grant(await st.reserve(Ask(budget=(b,), usd=0.25)))
    await st.settle(g, tokens=10, usd=1.0)
    r = refusal(await st.reserve(Ask(budget=(b,), usd=0.0)))
    assert r.limit == "monthly_usd" and r.used == pytest.approx(1.0)


async def test_release_drops_the_reservation_and_spends_nothing(env: Env) -> None:
    st = await env.make()
    b = BudgetScope("key", "k", Budget(daily_usd=1.0, daily_tokens=100))
    g = grant(await st.reserve(Ask(budget=(b,), tokens=100, usd=1.0)))
    refusal(await st.reserve(Ask(budget=(b,), tokens=1, usd=0.0)))
    await st.release(g)
    v = await st.view((), (b,))
    assert v.used[("key", "k", "2026-06-15")] == (0, 0)
    grant(await st.reserve(Ask(budget=(b,), tokens=100, usd=1.0)))


async def test_budget_periods_are_utc_days_and_months(env: Env) -> None:
    st = await env.make()
    b = BudgetScope("key", "k", Budget(daily_tokens=100, monthly_tokens=150))
    env.clock.wall = calendar.timegm((2026, 6, 30, 23, 59, 0, 0, 0, 0))
    g = grant(await st.reserve(Ask(budget=(b,), tokens=100)))
    assert (g.day, g.month) == ("2026-06-30", "2026-06")
    await st.settle(g, tokens=100, usd=0.0)
    env.clock.wall += 120  # 00:01 on the 1st of July: a new day and a new month
    g = grant(await st.reserve(Ask(budget=(b,), tokens=100)))
    assert (g.day, g.month) == ("2026-07-01", "2026-07")
    await st.settle(g, tokens=100, usd=0.0)
    env.clock.wall += 86400  # the next day: the daily cap is fresh, the month's is not
    r = refusal(await st.reserve(Ask(budget=(b,), tokens=100)))
    assert r.limit == "monthly_tokens" and r.used == 100


# -- one atomic reservation over every scope ----------------------------------------------


async def test_a_later_scope_refusing_leaves_earlier_ones_untouched(env: Env) -> None:
    st = await env.make()
    # Slow refill (0.1 request and 10 tokens a second), so Redis's real clock moving on
    # under a loaded CI machine cannot blur one request or 100 tokens taken by the refusal.
    k = key(RateLimits(requests_per_minute=6, tokens_per_minute=600, concurrent=10))
    t = Scope("team", "t", RateLimits(requests_per_minute=2))
    kb = BudgetScope("key", "k1", Budget(daily_tokens=10_000))
    ask = Ask((k, t), (kb,), tokens=100)
    grant(await st.reserve(ask))
    grant(await st.reserve(ask))
    r = refusal(await st.reserve(ask))
    assert r.scope == t and r.limit == "requests_per_minute"
    v = await st.view((k,), (kb,))
    kv = v.rate[("key", "k1")]
    assert kv.in_flight == 2  # the refused call took no slot,
    assert kv.requests_remaining is not None and 3.99 < kv.requests_remaining < 4.5  # no request,
    assert kv.tokens_remaining is not None and 399 < kv.tokens_remaining < 450  # no tokens,
    assert v.used[("key", "k1", "2026-06-15")][0] == 200  # and reserved no budget


async def test_a_budget_refusing_leaves_the_rate_limits_untouched(env: Env) -> None:
    st = await env.make()
    k = key(RateLimits(requests_per_minute=10, concurrent=5))
    tb = BudgetScope("team", "t", Budget(daily_usd=0.5))
    refusal(await st.reserve(Ask((k,), (tb,), usd=0.6)))
    v = await st.view((k,), ())
    assert v.rate[("key", "k1")].in_flight == 0
    assert v.headers["x-ratelimit-remaining-requests"] == "10"


# -- settle exactly once --------------------------------------------------------------------


async def test_settle_and_release_happen_once_however_often_called(env: Env) -> None:
    st = await env.make()
    k = key(RateLimits(tokens_per_minute=1000, concurrent=3))
    b = BudgetScope("key", "k1", Budget(daily_tokens=10_000))
    g = grant(await st.reserve(Ask((k,), (b,), tokens=100)))
    other = grant(await st.reserve(Ask((k,), (b,), tokens=100)))
    await st.settle(g, tokens=50, usd=0.0)
    await st.settle(g, tokens=50, usd=0.0)
    await st.release(g)
    v = await st.view((k,), (b,))
    assert v.rate[("key", "k1")].in_flight == 1  # only ``other``'s slot remains
    assert v.used[("key", "k1", "2026-06-15")][0] == 150  # 50 spent once + 100 reserved
    await st.release(other)


# -- leases (shared backends) ------------------------------------------------------------------


async def test_a_dead_process_slots_and_reservations_come_back_after_the_lease(redis_env: Env) -> None:
    dead = await redis_env.make(lease=0.5)
    alive = await redis_env.make(lease=0.5)
    k = key(RateLimits(concurrent=1))
    b = BudgetScope("key", "k1", Budget(daily_tokens=100))
    grant(await dead.reserve(Ask((k,), (b,), tokens=100)))
    assert isinstance(dead, RedisState)
    dead.forget_leases()  # it stops renewing without ending anything, as a killed process would
    refusal(await alive.reserve(Ask((k,), (b,), tokens=100)))
    deadline = time.monotonic() + 10
    while isinstance(r := await alive.reserve(Ask((k,), (b,), tokens=100)), Refusal):
        assert time.monotonic() < deadline, r
        await asyncio.sleep(0.05)  # bounded poll: the lease ends on Redis's clock


async def test_running_calls_keep_their_slots_past_the_lease_by_renewal(redis_env: Env) -> None:
    # A lease of 1 s renewed every third of it: a renewal may run 0.6 s late on a loaded
    # machine before the slot is lost (0.3 s leases were lost that way in CI).
    holder = await redis_env.make(lease=1.0)
    other = await redis_env.make(lease=1.0)
    ask = Ask((key(RateLimits(concurrent=1)),))
    g = grant(await holder.reserve(ask))
    await redis_env.elapse(2.5)  # two and a half leases, renewed meanwhile
    refusal(await other.reserve(ask))
    await holder.settle(g, tokens=0, usd=0.0)
    grant(await other.reserve(ask))


async def test_cluster_names_never_share_state(redis_env: Env) -> None:
    a, b = await redis_env.make("alpha"), await redis_env.make("beta")
    a2 = await redis_env.make("alpha")
    ask = Ask((key(RateLimits(requests_per_minute=2)),))
    grant(await a.reserve(ask))
    grant(await a2.reserve(ask))  # same cluster, another process: shares the bucket
    refusal(await a.reserve(ask))
    grant(await b.reserve(ask))
    assert isinstance(a, RedisState) and isinstance(b, RedisState)
    assert all(k.startswith("hapax:alpha:") for k in await a.keys())
    assert all(k.startswith("hapax:beta:") for k in await b.keys())


async def test_every_key_has_a_ttl(redis_env: Env) -> None:
    st = await redis_env.make()
    assert isinstance(st, RedisState)
    k = key(RateLimits(requests_per_minute=10, tokens_per_minute=1000, concurrent=2))
    b = BudgetScope("team", "t", Budget(daily_usd=5, monthly_tokens=10_000))
    g = grant(await st.reserve(Ask((k,), (b,), tokens=10, usd=0.01)))
    grant(await st.reserve(Ask((k,), (b,), tokens=10, usd=0.01)))
    await st.settle(g, tokens=20, usd=0.02)
    names = await st.keys()
    assert len(names) == 7
    for name in names:
        assert await st.client.pttl(name) > 0, name


# -- exact under concurrency --------------------------------------------------------------------


async def test_200_concurrent_reservations_against_a_limit_of_50_admit_exactly_50(env: Env) -> None:
    # On Redis, four processes' worth of clients race; on memory, one event loop.
    states = [await env.make() for _ in range(4)]
    ask = Ask((Scope("global", "", RateLimits(requests_per_minute=50)),))
    results = await asyncio.gather(*(states[i % 4].reserve(ask) for i in range(200)))
    assert sum(isinstance(r, Grant) for r in results) == 50
    conc = Ask((Scope("global", "", RateLimits(concurrent=50)),))
    results = await asyncio.gather(*(states[i % 4].reserve(conc) for i in range(200)))
    assert sum(isinstance(r, Grant) for r in results) == 50


async def test_redis_loses_its_scripts_and_the_backend_loads_them_again(redis_env: Env) -> None:
    st = await redis_env.make()
    assert isinstance(st, RedisState)
    await st.client.script_flush()
    grant(await st.reserve(Ask((key(RateLimits(requests_per_minute=5)),))))


async def test_a_kept_connection_redis_closed_while_idle_is_replaced_before_the_next_write(
    redis_env: Env,
) -> None:
    # What a Redis restart or its idle timeout does: the next reservation still succeeds,
    # on a new connection, without resending a batch Redis may have run.
    st = await redis_env.make()
    assert isinstance(st, RedisState)
    ask = Ask((key(RateLimits(requests_per_minute=5)),))
    grant(await st.reserve(ask))
    assert await st.client.client_kill_filter(_type="normal", skipme=True) >= 1
    await asyncio.sleep(0.05)  # the close reaches this process
    grant(await st.reserve(ask))
    assert st.batch.round_trips == 2


async def test_a_settlement_makes_no_round_trip_of_its_own_once_the_connection_has_answered(
    redis_env: Env,
) -> None:
    # A settlement's reply is read by nobody: after the first answered call it is written with
    # CLIENT REPLY SKIP, so a call ending on a quiet node costs one write and no wake-up.
    st = await redis_env.make()
    assert isinstance(st, RedisState)
    ask = Ask((key(RateLimits(concurrent=1)),), (BudgetScope("key", "k1", Budget(daily_usd=1.0)),), usd=0.01)
    g = grant(await st.reserve(ask))
    for _ in range(5):
        await st.settle(g, tokens=0, usd=0.02)
        await asyncio.sleep(0.01)  # nothing else queued: the settlement leaves alone
        g = grant(await st.reserve(ask))  # the one slot is free again: the settlement ran first
    assert st.batch.round_trips == 6 and st.batch.operations == 11
    await st.release(g)
    view = await st.view((key(RateLimits(concurrent=1)),), (BudgetScope("key", "k1", Budget(daily_usd=1.0)),))
    assert view.rate[("key", "k1")].in_flight == 0
    (_, spent), = [v for (kind, id_, period), v in view.used.items() if len(period) == 10]
    assert spent == pytest.approx(0.10)  # five settled at 0.02 each, the released one nothing


async def test_the_first_settlement_on_a_new_connection_waits_for_its_reply(redis_env: Env) -> None:
    # Skipping a reply could hide a NOSCRIPT, so a connection that has not yet answered a call
    # of ours (a Redis restart, an idle timeout) gets settlements as ordinary round trips.
    st = await redis_env.make()
    assert isinstance(st, RedisState)
    ask = Ask((key(RateLimits(concurrent=1)),))
    g = grant(await st.reserve(ask))
    assert await st.client.client_kill_filter(_type="normal", skipme=True) >= 1
    await asyncio.sleep(0.05)  # the close reaches this process
    await st.settle(g, tokens=0, usd=0.0)
    await st.batch.drain()
    assert st.batch.round_trips == 2
    grant(await st.reserve(ask))  # and it reached Redis: the slot is free


async def test_a_round_trip_past_the_timeout_fails_and_the_next_goes_on_a_new_connection(redis_url: str) -> None:
    st = RedisState.from_url(redis_url, cluster="slow", timeout=0.2)
    try:
        ask = Ask((key(RateLimits(requests_per_minute=5)),))
        grant(await st.reserve(ask))
        await st.client.execute_command("CLIENT", "PAUSE", "700", "ALL")
        t0 = time.monotonic()
        with pytest.raises(StateUnavailable):
            await st.reserve(ask)
        assert time.monotonic() - t0 < 0.6
        await asyncio.sleep(0.7)  # the pause ends; the late reply must not answer the next batch
        r = grant(await st.reserve(ask))
        assert r.headers["x-ratelimit-remaining-requests"] in ("2", "3")
    finally:
        await st.aclose()


async def test_a_round_trip_gets_its_whole_timeout_whenever_it_starts(redis_url: str) -> None:
    # One watchdog bounds every round trip in turn: one sent just before it fires for an
    # earlier round trip is not failed early, and is failed once its own timeout has passed.
    st = RedisState.from_url(redis_url, cluster="watchdog", timeout=0.3)
    try:
        ask = Ask((key(RateLimits(requests_per_minute=5)),))
        grant(await st.reserve(ask))  # arms the watchdog for 0.3 s from now
        await asyncio.sleep(0.2)
        await st.client.execute_command("CLIENT", "PAUSE", "800", "ALL")
        t0 = time.monotonic()
        with pytest.raises(StateUnavailable):
            await st.reserve(ask)
        waited = time.monotonic() - t0
        assert 0.28 <= waited < 0.6, waited
    finally:
        await asyncio.sleep(0.6)  # the pause ends before the state closes
        await st.aclose()


async def test_a_settle_reaches_the_state_before_a_reservation_made_after_it(env: Env) -> None:
    # A client whose call just ended sends its next one at once: its own slot must be free,
    # even when the settle and the next reservation go to Redis in the same round trip.
    st = await env.make()
    ask = Ask((key(RateLimits(concurrent=1)),))
    g = grant(await st.reserve(ask))
    for _ in range(20):
        settled = st.settle(g, tokens=0, usd=0.0)
        g = grant(await st.reserve(ask))
        await settled
    await st.release(g)
