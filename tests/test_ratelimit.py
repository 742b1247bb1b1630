"""The pure cores of access control: token bucket, limiter, budgets, prices, audit chain."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from hapax.access._audit import FileAudit, verify
from hapax.access._pricing import PriceTable, cost_usd
from hapax.config import Budget, ModelPrice, RateLimits
from hapax.state import (
    BudgetDenied,
    BudgetGrant,
    BudgetLedger,
    BudgetScope,
    RateDenied,
    RateGrant,
    RateLimiter,
    Scope,
    TokenBucket,
    format_duration,
)


def test_bucket_starts_full_and_refills_continuously() -> None:
    b = TokenBucket.full(capacity=3, per_minute=60, now=0.0)
    for _ in range(3):
        assert b.wait(1, now=0.0) == 0
        b.take(1, now=0.0)
    assert b.wait(1, now=0.0) == pytest.approx(1.0)
    assert b.wait(1, now=0.5) == pytest.approx(0.5)
    assert b.wait(1, now=1.0) == 0
    assert b.reset_in(now=1.0) == pytest.approx(2.0)
    assert b.available(now=100.0) == 3  # never above capacity


def test_bucket_debt_and_oversized_requests() -> None:
    b = TokenBucket.full(capacity=100, per_minute=600, now=0.0)  # 10/s
    b.take(250, now=0.0)  # more than capacity: allowed from full, leaves a debt
    assert b.available(now=0.0) == -150
    assert b.wait(250, now=0.0) == pytest.approx(25.0)  # needs only a full bucket
    b.give(-20, now=0.0)  # reconciliation: used 20 more than reserved
    assert b.available(now=0.0) == -170


def test_limiter_admits_exactly_the_burst_then_refuses_with_retry_after() -> None:
    lim = RateLimiter()
    s = (Scope("key", "k1", RateLimits(requests_per_minute=60, request_burst=5)),)
    results = [lim.reserve(s, 0, now=0.0) for _ in range(20)]
    assert sum(isinstance(r, RateGrant) for r in results) == 5
    denied = results[5]
    assert isinstance(denied, RateDenied) and denied.limit == "requests_per_minute"
    assert denied.retry_after == pytest.approx(1.0)
    assert isinstance(lim.reserve(s, 0, now=1.0), RateGrant)


def test_limiter_checks_every_scope_before_taking_anything() -> None:
    lim = RateLimiter()
    key = Scope("key", "k", RateLimits(requests_per_minute=100))
    team = Scope("team", "t", RateLimits(requests_per_minute=2))
    assert isinstance(lim.reserve((key, team), 0, now=0.0), RateGrant)
    assert isinstance(lim.reserve((key, team), 0, now=0.0), RateGrant)
    d = lim.reserve((key, team), 0, now=0.0)
    assert isinstance(d, RateDenied) and d.scope.kind == "team"
    # The refused call took nothing from the key's bucket.
    g = lim.reserve((key,), 0, now=0.0)
    assert isinstance(g, RateGrant) and g.headers["x-ratelimit-remaining-requests"] == "97"


def test_tokens_reserved_then_reconciled_and_concurrency_released() -> None:
    lim = RateLimiter()
    s = (Scope("key", "k", RateLimits(tokens_per_minute=1000, concurrent=2)),)
    g1 = lim.reserve(s, 400, now=0.0)
    g2 = lim.reserve(s, 400, now=0.0)
    assert isinstance(g1, RateGrant) and isinstance(g2, RateGrant)
    d = lim.reserve(s, 1, now=0.0)
    assert isinstance(d, RateDenied) and d.limit == "concurrent"
    lim.settle(g1, 100, now=0.0)  # used 300 fewer than reserved: refunded
    lim.settle(g1, 100, now=0.0)  # settling twice is a no-op
    g3 = lim.reserve(s, 500, now=0.0)
    assert isinstance(g3, RateGrant)
    assert g3.headers["x-ratelimit-remaining-tokens"] == "0"
    assert g3.headers["x-ratelimit-limit-tokens"] == "1000"
    d = lim.reserve(s, 1, now=0.0)
    assert isinstance(d, RateDenied)


def test_format_duration_like_openai() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(1.0) == "1s"
    assert format_duration(360) == "6m0s"


T0 = float(calendar.timegm((2025, 3, 31, 23, 0, 0, 0, 0, 0)))


def test_budget_reserves_estimate_and_settles_actual() -> None:
    led = BudgetLedger()
    s = (BudgetScope("team", "a", Budget(daily_tokens=1000)),)
    grants = [led.reserve(s, 300, 0.0, now=T0) for _ in range(4)]
    assert [isinstance(g, BudgetGrant) for g in grants] == [True, True, True, False]
    d = grants[3]
    assert isinstance(d, BudgetDenied) and d.limit == "daily_tokens" and d.retry_after == pytest.approx(3600)
    g = grants[0]
    assert isinstance(g, BudgetGrant)
    led.settle(g, 50, 0.0)
    assert led.used("team", "a", "2025-03-31") == (650.0, 0.0)
    assert isinstance(led.reserve(s, 300, 0.0, now=T0), BudgetGrant)


def test_budget_usd_caps_and_reached_cap_refuses_zero_estimates() -> None:
    led = BudgetLedger()
    s = (BudgetScope("key", "k", Budget(monthly_usd=1.0)),)
    g = led.reserve(s, 10, 0.6, now=T0)
    assert isinstance(g, BudgetGrant)
    assert isinstance(led.reserve(s, 10, 0.6, now=T0), BudgetDenied)
    led.settle(g, 10, 1.0)
    d = led.reserve(s, 0, 0.0, now=T0)
    assert isinstance(d, BudgetDenied) and d.limit == "monthly_usd"
    assert d.retry_after == pytest.approx(3600)  # the month ends with the day
    # A new month starts afresh.
    assert isinstance(led.reserve(s, 10, 0.6, now=T0 + 7200), BudgetGrant)


def test_budget_release_returns_the_reservation() -> None:
    led = BudgetLedger()
    s = (BudgetScope("key", "k", Budget(daily_tokens=100)),)
    g = led.reserve(s, 100, 0.0, now=T0)
    assert isinstance(g, BudgetGrant)
    led.release(g)
    led.release(g)
    assert led.used("key", "k", "2025-03-31") == (0.0, 0.0)


def test_prices_defaults_dated_names_and_overrides() -> None:
    t = PriceTable({"my-model": ModelPrice(input=1.0, output=2.0)})
    p = t.find("fast", provider="oai", upstream="gpt-4o-mini-2024-07-18")
    assert (p.input, p.output, p.cached_input) == (0.15, 0.60, 0.075)
    assert t.find("my-model").output == 2.0
    assert t.find("unknown-thing").input == 0.0
    c = cost_usd(t.find("gpt-4o"), prompt=1_000_000, completion=1_000_000, cached=500_000)
    assert c == pytest.approx(0.5 * 2.50 + 0.5 * 1.25 + 10.0)


def test_audit_chain_verifies_and_names_an_edited_line(tmp_path: Path) -> None:
    a = FileAudit(tmp_path, max_bytes=4096, retention_days=30)
    for i in range(40):  # enough to rotate a few times
        a.record("key.created", actor="admin", target=f"key_{i}", details={"i": i}, now=1000.0 + i)
    files = sorted(p.name for p in tmp_path.glob("audit*.jsonl"))
    assert len(files) > 1 and "audit.jsonl" in files
    res = verify(tmp_path)
    assert res.ok and res.events == 40, res.problems
    # A second writer (the CLI) continues the same chain.
    FileAudit(tmp_path, max_bytes=4096, retention_days=30).record("key.revoked", actor="cli")
    a.record("key.rotated", actor="admin")
    assert verify(tmp_path).ok
    live = tmp_path / "audit.jsonl"
    lines = live.read_text().splitlines()
    lines[1] = lines[1].replace('"actor":"admin"', '"actor":"mallory"')
    live.write_text("\n".join(lines) + "\n")
    res = verify(tmp_path)
    assert not res.ok
    assert res.problems[0].startswith(f"{live}:2: event altered")


def test_audit_verify_notices_a_deleted_line(tmp_path: Path) -> None:
    a = FileAudit(tmp_path, max_bytes=1 << 20, retention_days=30)
    for i in range(5):
        a.record("auth.failed", actor="unknown", details={"i": i})
    live = tmp_path / "audit.jsonl"
    lines = live.read_text().splitlines()
    del lines[2]
    live.write_text("\n".join(lines) + "\n")
    res = verify(live)
    assert not res.ok and f"{live}:3: chain broken" in res.problems[0]
