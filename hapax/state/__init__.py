"""Shared state behind async seams: rate limits, concurrency, quotas and budgets.

``AccessState`` is the seam (``reserve`` one ``Ask`` over every scope at once,
``settle`` or ``release`` the ``Grant`` exactly once, ``view`` for headers and
``GET /v1/me``). ``MemoryState`` is the embedded default; ``RedisState`` shares
one set of limits across processes and nodes; ``FailoverState`` puts a breaker
and the ``on_redis_failure`` policy around Redis. ``node`` builds one and hands
it to the core.
"""

from ._base import (
    DONE,
    AccessState,
    Ask,
    FailurePolicy,
    Grant,
    RateView,
    Refusal,
    StateUnavailable,
    StateView,
)
from ._budget import BudgetDenied, BudgetGrant, BudgetLedger, BudgetScope, day_of, month_of, seconds_to_period_end
from ._failover import DEFAULT_RETRY_INTERVAL, FailoverState
from ._memory import MemoryState
from ._ratelimit import RateDenied, RateGrant, RateLimiter, Scope, TokenBucket, format_duration, tightest_headers
from ._redis import DEFAULT_LEASE_SECONDS, RedisState

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_RETRY_INTERVAL",
    "DONE",
    "AccessState",
    "Ask",
    "BudgetDenied",
    "BudgetGrant",
    "BudgetLedger",
    "BudgetScope",
    "FailoverState",
    "FailurePolicy",
    "Grant",
    "MemoryState",
    "RateDenied",
    "RateGrant",
    "RateLimiter",
    "RateView",
    "RedisState",
    "Refusal",
    "Scope",
    "StateUnavailable",
    "StateView",
    "TokenBucket",
    "day_of",
    "format_duration",
    "month_of",
    "seconds_to_period_end",
    "tightest_headers",
]
