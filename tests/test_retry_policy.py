"""The retry schedule and the balancing strategies, as pure functions of time and rng."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from hapax._errors import UpstreamBadRequest, UpstreamRateLimited, UpstreamUnavailable
from hapax.config._reliability import RetryConfig
from hapax.routing._balancer import (
    LATENCY_STALE_AFTER,
    STRATEGIES,
    Strategy,
    build_strategy,
    ewma,
    register_strategy,
)
from hapax.routing._retry import GiveUp, Retry, RetryPlan


def _plan(**kw: float) -> RetryPlan:
    return RetryPlan(RetryConfig(**kw), now=0.0, rng=random.Random(1))  # type: ignore[arg-type]


def test_failover_to_a_fresh_deployment_waits_nothing() -> None:
    p = _plan()
    p.start_attempt()
    assert p.next_step(UpstreamUnavailable("x"), repeat=0, retry_after=None, now=0.0) == Retry(0.0)


def test_same_deployment_backs_off_with_full_jitter_within_the_ceiling() -> None:
    p = _plan(max_attempts=10, backoff_base=0.1, backoff_max=0.4)
    p.start_attempt()
    for repeat, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 0.4)):
        step = p.next_step(UpstreamUnavailable("x"), repeat=repeat, retry_after=None, now=0.0)
        assert isinstance(step, Retry) and 0.0 <= step.delay <= ceiling


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    p = _plan(retry_after_cap=5)
    p.start_attempt()
    step = p.next_step(UpstreamRateLimited("x"), repeat=1, retry_after=2.0, now=0.0)
    assert isinstance(step, Retry) and step.delay >= 2.0
    assert p.next_step(UpstreamRateLimited("x"), repeat=1, retry_after=6.0, now=0.0) == GiveUp(
        "retry_after_too_long")


def test_bounded_by_attempts_deadline_and_retryability() -> None:
    p = _plan(max_attempts=2, deadline=10)
    p.start_attempt()
    assert p.next_step(UpstreamBadRequest("x"), repeat=0, retry_after=None, now=0.0) == GiveUp("not_retryable")
    assert p.next_step(ValueError("bug"), repeat=0, retry_after=None, now=0.0) == GiveUp("not_retryable")
    assert p.next_step(UpstreamUnavailable("x"), repeat=0, retry_after=None, now=10.0) == GiveUp("deadline")
    p.start_attempt()
    assert p.next_step(UpstreamUnavailable("x"), repeat=0, retry_after=None, now=0.0) == GiveUp("max_attempts")
    assert p.remaining(now=4.0) == 6.0


@dataclass
class Cand:
    key: str
    weight: float = 1.0
    priority: int = 0
    in_flight: int = 0
    latency: float | None = None
    latency_at: float = 0.0


def _keys(cs: list[Cand]) -> list[str]:
    return [c.key for c in cs]


def test_failover_orders_by_priority_then_config_order() -> None:
    cs = [Cand("a", priority=1), Cand("b", priority=0), Cand("c", priority=1)]
    assert _keys(build_strategy("failover").order(cs, now=0, rng=random.Random(0))) == ["b", "a", "c"]


def test_round_robin_rotates() -> None:
    s = build_strategy("round_robin")
    cs = [Cand("a"), Cand("b"), Cand("c")]
    firsts = [s.order(cs, now=0, rng=random.Random(0))[0].key for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_weighted_follows_weights() -> None:
    s = build_strategy("weighted")
    rng = random.Random(7)
    cs = [Cand("a", weight=3), Cand("b", weight=1)]
    firsts = Counter(s.order(cs, now=0, rng=rng)[0].key for _ in range(4000))
    assert 0.7 < firsts["a"] / 4000 < 0.8


def test_least_in_flight_per_weight() -> None:
    cs = [Cand("a", in_flight=4, weight=2), Cand("b", in_flight=3), Cand("c", in_flight=1)]
    assert _keys(build_strategy("least_in_flight").order(cs, now=0, rng=random.Random(0))) == ["c", "a", "b"]


def test_latency_prefers_fast_measures_unknown_and_stale_explores() -> None:
    s = build_strategy("latency")
    fast, slow = Cand("fast", latency=0.1, latency_at=100), Cand("slow", latency=0.9, latency_at=100)
    rng = random.Random(3)
    firsts = Counter(s.order([slow, fast], now=101, rng=rng)[0].key for _ in range(2000))
    assert firsts["fast"] > 1800 and firsts["slow"] > 0  # exploration: the slow one is retried now and then
    new = Cand("new")
    assert sum(s.order([fast, new], now=101, rng=rng)[0].key == "new" for _ in range(100)) > 90
    # A sample older than LATENCY_STALE_AFTER is re-measured first, however slow it was.
    old = Cand("old-slow", latency=5.0, latency_at=0)
    later = LATENCY_STALE_AFTER + 1
    fresh = Cand("fast", latency=0.1, latency_at=later)
    assert sum(s.order([fresh, old], now=later, rng=rng)[0].key == "old-slow" for _ in range(100)) > 90
    assert ewma(None, 1.0) == 1.0 and 1.0 < ewma(1.0, 2.0) < 2.0


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    assert {"failover", "weighted", "round_robin", "least_in_flight", "latency"} <= set(STRATEGIES)
    with pytest.raises(RuntimeError):
        register_strategy("failover", lambda: build_strategy("failover"))
    with pytest.raises(RuntimeError):
        build_strategy("nope")
    assert isinstance(build_strategy("latency"), Strategy)
