"""The circuit breaker core, driven by hand-advanced time."""

from __future__ import annotations

import pytest

from hapax.config._reliability import BreakerConfig
from hapax.routing._breaker import (
    TRANSITIONS,
    BreakerState,
    BreakerStateError,
    CircuitBreaker,
    Permit,
    Trigger,
)

C, OPEN, H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def _fail(b: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        p = b.acquire(now=now)
        assert p is not None
        b.on_failure(p, now=now)


def _ok(b: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        p = b.acquire(now=now)
        assert p is not None
        b.on_success(p, now=now)


def test_opens_after_consecutive_failures_and_success_resets_the_run() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=3, min_requests=100))
    _fail(b, 0.0, 2)
    _ok(b, 0.1)
    _fail(b, 0.2, 2)
    assert b.state is C
    _fail(b, 0.3)
    assert b.state is OPEN
    [t] = b.take_events()
    assert (t.old, t.new, t.trigger, t.at) == (C, OPEN, Trigger.TRIPPED, 0.3)
    assert b.acquire(now=0.4) is None


def test_opens_on_failure_rate_over_the_window_once_enough_calls() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=100, failure_rate=0.5, window=10, min_requests=4))
    _ok(b, 0.0)
    _fail(b, 0.5)
    _ok(b, 1.0)
    assert b.state is C  # half failed, but only 3 calls
    _fail(b, 1.5)
    assert b.state is OPEN


def test_old_outcomes_leave_the_window() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=100, failure_rate=0.5, window=10, min_requests=4))
    _fail(b, 0.0)
    _ok(b, 0.0)
    _fail(b, 0.0)
    assert b.failure_counts(now=5.0) == (3, 2)
    assert b.failure_counts(now=20.0) == (0, 0)
    _ok(b, 20.0, 3)
    _fail(b, 20.0)
    assert b.state is C  # 1 of 4 in the window, not 3 of 7


def test_half_open_lets_limited_trials_then_closes_after_successes() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=5, half_open_trials=2, close_after=2))
    _fail(b, 0.0)
    assert b.next_deadline() == 5.0
    assert not b.available(now=4.9)
    t1 = b.acquire(now=5.0)
    t2 = b.acquire(now=5.0)
    assert b.state is H and t1 is not None and t2 is not None and t1.trial
    assert b.acquire(now=5.0) is None  # both trial slots taken
    b.on_success(t1, now=5.1)
    assert b.state is H
    b.on_success(t2, now=5.2)
    assert b.state is C
    assert [e.new for e in b.take_events()] == [OPEN, H, C]


def test_failed_trial_reopens_for_another_period() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=5))
    _fail(b, 0.0)
    p = b.acquire(now=6.0)
    assert p is not None
    b.on_failure(p, now=6.5)
    assert b.state is OPEN and b.opened_until == 11.5


def test_stale_permit_from_before_the_trip_is_ignored() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=5))
    slow = b.acquire(now=0.0)
    _fail(b, 0.1)
    b.poll(now=6.0)
    assert b.state is H
    assert slow is not None
    b.on_success(slow, now=6.1)  # began while closed: not a trial, proves nothing now
    assert b.state is H


def test_abandoned_trial_frees_its_slot() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=1))
    _fail(b, 0.0)
    p = b.acquire(now=1.0)
    assert p is not None and b.acquire(now=1.0) is None
    b.on_abandoned(p, now=1.1)
    assert b.acquire(now=1.2) is not None


def test_cool_down_blocks_whatever_the_state_and_is_capped() -> None:
    b = CircuitBreaker(BreakerConfig(max_cooldown=30))
    b.cool_down(2.0, now=10.0)
    assert not b.available(now=11.0) and b.acquire(now=11.0) is None
    assert b.available(now=12.0) and b.state is C
    b.cool_down(1000, now=20.0)
    assert b.cooling_until == 50.0


def test_probes_open_and_half_open() -> None:
    b = CircuitBreaker(BreakerConfig(open_for=60))
    b.probe_down(now=1.0)
    assert b.state is OPEN
    b.probe_up(now=2.0)
    assert b.state is H  # real traffic confirms the recovery
    b.probe_up(now=3.0)  # nothing to do unless open
    assert b.state is H


def test_stream_failure_counts_only_while_closed() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=2))
    b.on_stream_failure(now=0.0)
    b.on_stream_failure(now=0.1)
    assert b.state is OPEN
    b.on_stream_failure(now=0.2)
    assert b.state is OPEN


def test_illegal_transition_raises() -> None:
    b = CircuitBreaker(BreakerConfig())
    assert (C, Trigger.OPEN_ELAPSED) not in TRANSITIONS
    with pytest.raises(BreakerStateError):
        b._go(Trigger.OPEN_ELAPSED, 0.0)
    with pytest.raises(BreakerStateError):
        b._go(Trigger.TRIALS_PASSED, 0.0)


def test_permit_is_frozen() -> None:
    p = Permit(0, trial=False)
    with pytest.raises(AttributeError):
        p.epoch = 3  # type: ignore[misc]


def test_a_peers_open_opens_for_the_time_it_has_left_and_is_not_shared_again() -> None:
    from hapax.routing._breaker import SHARED_OPENS

    b = CircuitBreaker(BreakerConfig(open_for=30))
    b.peer_open(12.0, now=100.0)
    assert b.state is OPEN and b.opened_until == 112.0
    [t] = b.take_events()
    assert t.trigger is Trigger.PEER_OPEN and t.trigger not in SHARED_OPENS
    b.peer_open(20.0, now=101.0)  # already open: the later end wins, no new transition
    assert b.opened_until == 121.0 and b.take_events() == []
    b.peer_open(500.0, now=102.0)  # never longer than this node's own open_for
    assert b.opened_until == 132.0
    b.poll(now=132.0)
    assert b.state is H  # and it recovers by its own trials, as any open breaker
    _fail(b, 132.0)
    assert b.state is OPEN and b.take_events()[-1].trigger in SHARED_OPENS
