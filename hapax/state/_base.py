"""The access-state seam: one atomic reservation per request, settled exactly once.

Theory of operation: a request asks for everything it may consume at once, an
``Ask`` over every scope that applies (key, team, global): one request and its
estimated tokens from each requests/tokens-per-minute bucket, one concurrency
slot from each scope that caps calls in flight, and its estimated tokens and
dollars from each daily and monthly budget. ``reserve`` checks all of it and,
only if everything has room, takes all of it, in one step no other caller can
interleave with (no ``await`` in the memory backend, one Lua script in Redis).
Otherwise it returns a ``Refusal`` naming the first scope and limit that would
be passed, and nothing was taken: there is never a half-reservation to undo.

A ``Grant`` ends exactly once: ``settle`` with what the call really used (token
buckets corrected by ``actual - estimate``, the budget reservation moved to
spent, slots given back) or ``release`` when the call never ran. A second
settle or release of the same grant does nothing. Both are *committed when
called*, not when awaited (a shared backend queues them for its next round
trip and returns), so a caller cancelled while awaiting (a client hanging up)
loses nothing, and a response never waits on Redis for its settlement.

Shared backends hold slots and budget reservations as leases that expire unless
renewed, so a process that dies holding them gives them back by itself.

Rules every backend keeps (the contract suite, tests/test_state_contract.py):
a bucket may go below zero on settle (debt that later callers wait out); a call
needing more tokens than a bucket holds passes when the bucket is full; a budget
admits while ``spent + reserved + estimate <= cap``, and a reached cap refuses
even a zero estimate; budget periods are UTC calendar days and months.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

from ._budget import BudgetScope
from ._ratelimit import Scope

#: What happens to a request whose shared limits cannot be checked (Redis down).
FailurePolicy = Literal["fail_open", "fail_closed"]


@dataclass(frozen=True, slots=True)
class Ask:
    """Everything one request may consume, over every scope at once."""

    rate: tuple[Scope, ...] = ()
    budget: tuple[BudgetScope, ...] = ()
    #: Estimated prompt plus output tokens.
    tokens: int = 0
    #: Estimated cost in US dollars.
    usd: float = 0.0
    #: When the shared state is unreachable: fall back to local limits, or refuse.
    on_failure: FailurePolicy = "fail_open"

    def any(self) -> bool:
        return bool(self.rate or self.budget)


@dataclass(slots=True, eq=False)
class Grant:
    """A reservation that ``settle`` or ``release`` ends, once."""

    #: Unique across processes for a shared backend's grant; empty for an in-process one.
    id: str
    ask: Ask
    #: ``x-ratelimit-*`` headers as the buckets stood after the reservation.
    headers: dict[str, str] = field(default_factory=dict)
    #: The UTC day (``YYYY-MM-DD``) and month (``YYYY-MM``) the call is charged to.
    day: str = ""
    month: str = ""
    done: bool = False
    #: The backend's own handle for it (the memory grants; a lease's keys).
    handle: Any = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was refused; nothing was taken."""

    scope: Scope | BudgetScope | None
    #: requests_per_minute, tokens_per_minute, concurrent, daily_tokens, monthly_tokens,
    #: daily_usd, monthly_usd, or state_unavailable (shared state down under fail_closed).
    limit: str
    #: The limit's value (a rate, a slot count, a cap).
    value: float
    retry_after: float
    #: Budgets: spent plus reserved when refused.
    used: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_budget(self) -> bool:
        return self.limit in ("daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd")


@dataclass(frozen=True, slots=True)
class RateView:
    """One scope's rate limits as they stand (``GET /v1/me``)."""

    requests_remaining: float | None = None
    requests_reset: float = 0.0
    tokens_remaining: float | None = None
    tokens_reset: float = 0.0
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class StateView:
    """Rate limits and budget use of some scopes, taking nothing."""

    #: ``x-ratelimit-*`` headers for all the rate scopes together (the tightest of each).
    headers: dict[str, str]
    #: By (kind, id).
    rate: dict[tuple[str, str], RateView]
    #: (tokens, usd) spent plus reserved, by (kind, id, period).
    used: dict[tuple[str, str, str], tuple[float, float]]


class StateUnavailable(Exception):
    """The shared state could not be reached in time; the failure policy decides what follows."""


class _Done:
    """An awaitable that is already complete: what an in-process settle returns."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator, so ``await`` works


DONE: Awaitable[None] = _Done()


class AccessState(ABC):
    """Rate limits, concurrency, quotas and budgets of every scope: one backend per process."""

    #: A short name for logs and /metrics: memory or redis.
    name = "state"

    @abstractmethod
    async def reserve(self, ask: Ask) -> Grant | Refusal:
        """Check every limit of ``ask``; take all of it or nothing."""

    @abstractmethod
    def settle(self, grant: Grant, *, tokens: int, usd: float) -> Awaitable[None]:
        """End ``grant`` with what the call used. Committed on call; a second call does nothing."""

    @abstractmethod
    def release(self, grant: Grant) -> Awaitable[None]:
        """End ``grant`` whose call never ran: give back tokens, slots and the budget reservation."""

    @abstractmethod
    async def view(self, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...]) -> StateView:
        """The limits and budget use of these scopes as they stand (headers, ``GET /v1/me``)."""

    def restore_spent(self, kind: str, id: str, period: str, tokens: float, usd: float) -> None:  # noqa: B027 - optional hook
        """Seed spend read back from the usage file at start-up.

        Only a process-local backend needs it: a shared one keeps its own tallies, and
        seeding those from one node's file would count the spend twice.
        """

    def housekeeping(self, *, now: float) -> None:  # noqa: B027 - optional hook
        """Forget what can no longer matter (past budget periods); called with the usage flush."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (lease renewal); call once the event loop runs."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and close connections."""
