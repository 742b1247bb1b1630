"""Shared state behind async seams: rate limits, concurrency, quotas and budgets; slots, dedup, health.

``AccessState`` is the seam (``reserve`` one ``Ask`` over every scope at once,
``settle`` or ``release`` the ``Grant`` exactly once, ``view`` for headers and
``GET /v1/me``). ``MemoryState`` is the embedded default; ``RedisState`` shares
one set of limits across processes and nodes; ``FailoverState`` puts a breaker
and the ``on_redis_failure`` policy around Redis. ``node`` builds one and hands
it to the core.

Routing's seams: ``Slots`` (concurrency slots and the priority queue; ``SlotGate``
in memory, ``RedisSlots`` shared), ``InFlight`` (in-flight dedup;
``MemoryInFlight``, ``RedisInFlight``) and ``HealthNewsBus`` (breaker opens,
429 cool-downs and probe verdicts told to peers; ``LocalHealthNews``,
``RedisHealthNews``). Their Redis backends share one breaker (under ``node`` the
access state's, ``AccessStateBreaker``), one pub/sub ``Bus`` per process, and a
``Script`` per Lua script.
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
from ._batch import Batcher, RedisUnavailable
from ._budget import BudgetDenied, BudgetGrant, BudgetLedger, BudgetScope, day_of, month_of, seconds_to_period_end
from ._bus import Bus
from ._dedup import Codec, InFlight, MemoryInFlight, dedup_key
from ._dedup_redis import DEDUP_LUA, RedisInFlight
from ._failover import DEFAULT_RETRY_INTERVAL, FailoverState
from ._health import HealthNews, HealthNewsBus, LocalHealthNews, NewsKind
from ._health_redis import HEALTH_LUA, RedisHealthNews
from ._memory import MemoryState
from ._ratelimit import RateDenied, RateGrant, RateLimiter, Scope, TokenBucket, format_duration, tightest_headers
from ._redis import DEFAULT_LEASE_SECONDS, RedisState
from ._script import AccessStateBreaker, RedisBreaker, Script
from ._slots import GLOBAL, Alternatives, Overloaded, QueueFull, Slot, SlotGate, Slots, SlotTable, overload_error
from ._slots_redis import SLOTS_LUA, RedisSlots

__all__ = [
    "DEDUP_LUA",
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_RETRY_INTERVAL",
    "DONE",
    "GLOBAL",
    "HEALTH_LUA",
    "SLOTS_LUA",
    "AccessState",
    "AccessStateBreaker",
    "Alternatives",
    "Ask",
    "Batcher",
    "BudgetDenied",
    "BudgetGrant",
    "BudgetLedger",
    "BudgetScope",
    "Bus",
    "Codec",
    "FailoverState",
    "FailurePolicy",
    "Grant",
    "HealthNews",
    "HealthNewsBus",
    "InFlight",
    "LocalHealthNews",
    "MemoryInFlight",
    "MemoryState",
    "NewsKind",
    "Overloaded",
    "QueueFull",
    "RateDenied",
    "RateGrant",
    "RateLimiter",
    "RateView",
    "RedisBreaker",
    "RedisHealthNews",
    "RedisInFlight",
    "RedisSlots",
    "RedisState",
    "RedisUnavailable",
    "Refusal",
    "Scope",
    "Script",
    "Slot",
    "SlotGate",
    "SlotTable",
    "Slots",
    "StateUnavailable",
    "StateView",
    "TokenBucket",
    "day_of",
    "dedup_key",
    "format_duration",
    "month_of",
    "overload_error",
    "seconds_to_period_end",
    "tightest_headers",
]
