"""Rate limits: token buckets for requests and tokens per minute, and concurrency slots.

Theory of operation: every scope (a key, a team, the gateway) may limit
requests per minute, tokens per minute and requests in flight. Requests and
tokens each use a ``TokenBucket``: capacity ``burst`` (the per-minute figure
unless set), refilled continuously at ``per_minute / 60`` a second.

Before a call, ``RateLimiter.reserve`` checks every bucket and slot of every
scope that applies and, only if all have room, takes one request, the
estimated tokens and one slot from each. Check and take happen in one
synchronous call with no ``await`` inside, so on one event loop N concurrent
callers can never be admitted past a limit. After the call, ``settle`` gives
back the slot and corrects the token buckets by ``actual - estimate``: a
bucket may go below zero when a call used more than it reserved, which makes
the next callers wait for the debt to refill.

A request needing more tokens than a bucket can ever hold passes when the
bucket is full (and drives it negative), rather than being refused forever.

Pure: no clock reads, no I/O. Time comes in as ``now`` (seconds, monotonic).
This is the rate half of the memory backend (``hapax.state.MemoryState``);
the Redis backend runs the same rules in Lua (``hapax.state._scripts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import RateLimits


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    #: Units added per second.
    rate: float
    level: float
    stamp: float

    @classmethod
    def full(cls, *, capacity: float, per_minute: float, now: float) -> TokenBucket:
        return cls(capacity=capacity, rate=per_minute / 60.0, level=capacity, stamp=now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def available(self, *, now: float) -> float:
        self._refill(now)
        return self.level

    def wait(self, n: float, *, now: float) -> float:
        """Seconds until ``n`` can be taken; 0 if it can be now."""
        self._refill(now)
        need = min(n, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, n: float, *, now: float) -> None:
        self._refill(now)
        self.level -= n

    def give(self, n: float, *, now: float) -> None:
        """Return ``n`` (or take it, if negative); never above capacity."""
        self._refill(now)
        self.level = min(self.capacity, self.level + n)

    def reset_in(self, *, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*``)."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)

    def reconfigure(self, *, capacity: float, per_minute: float, now: float) -> None:
        self._refill(now)
        self.capacity = capacity
        self.rate = per_minute / 60.0
        self.level = min(self.level, capacity)


@dataclass(frozen=True, slots=True)
class Scope:
    """One place limits apply: ``kind`` is key, team or global."""

    kind: str
    id: str
    limits: RateLimits

    @property
    def label(self) -> str:
        return self.kind if self.kind == "global" else f"{self.kind} {self.id!r}"


@dataclass(frozen=True, slots=True)
class RateDenied:
    scope: Scope
    #: requests_per_minute, tokens_per_minute or concurrent.
    limit: str
    limit_value: int
    retry_after: float
    #: The ``x-ratelimit-*`` headers as the buckets stand: a refusal reports them too.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RateGrant:
    scopes: tuple[Scope, ...]
    tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


class RateLimiter:
    """The memory backend: buckets and in-flight counts of one process."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def _bucket(self, scope: Scope, kind: str, per_minute: int, burst: int | None, now: float) -> TokenBucket:
        capacity = float(burst or per_minute)
        k = (scope.kind, scope.id, kind)
        b = self._buckets.get(k)
        if b is None:
            b = self._buckets[k] = TokenBucket.full(capacity=capacity, per_minute=per_minute, now=now)
        elif b.capacity != capacity or b.rate != per_minute / 60.0:
            b.reconfigure(capacity=capacity, per_minute=per_minute, now=now)
        return b

    def in_flight(self, scope: Scope) -> int:
        return self._in_flight.get((scope.kind, scope.id), 0)

    def reserve(self, scopes: tuple[Scope, ...], tokens: int, *, now: float) -> RateGrant | RateDenied:
        # Check everything first, then take everything: no partial reservations to undo.
        denied = self.check(scopes, tokens, now=now)
        if denied is not None:
            return denied
        self.take(scopes, tokens, now=now)
        return RateGrant(scopes, tokens, self.headers(scopes, now=now))

    def check(self, scopes: tuple[Scope, ...], tokens: int, *, now: float) -> RateDenied | None:
        """The first limit of ``scopes`` a call of ``tokens`` would pass; ``None`` if none. Takes nothing."""
        for s in scopes:
            lim = s.limits
            if lim.concurrent is not None and self.in_flight(s) >= lim.concurrent:
                return RateDenied(s, "concurrent", lim.concurrent, 1.0, self.headers(scopes, now=now))
            if lim.requests_per_minute is not None:
                b = self._bucket(s, "req", lim.requests_per_minute, lim.request_burst, now)
                w = b.wait(1, now=now)
                if w > 0:
                    return RateDenied(
                        s, "requests_per_minute", lim.requests_per_minute, w, self.headers(scopes, now=now)
                    )
            if lim.tokens_per_minute is not None:
                b = self._bucket(s, "tok", lim.tokens_per_minute, None, now)
                w = b.wait(tokens, now=now)
                if w > 0:
                    return RateDenied(
                        s, "tokens_per_minute", lim.tokens_per_minute, w, self.headers(scopes, now=now)
                    )
        return None

    def take(self, scopes: tuple[Scope, ...], tokens: int, *, now: float) -> None:
        """Take one request, ``tokens`` and a slot from every scope; only after ``check`` passed."""
        for s in scopes:
            lim = s.limits
            if lim.concurrent is not None:
                k = (s.kind, s.id)
                self._in_flight[k] = self._in_flight.get(k, 0) + 1
            if lim.requests_per_minute is not None:
                self._bucket(s, "req", lim.requests_per_minute, lim.request_burst, now).take(1, now=now)
            if lim.tokens_per_minute is not None:
                self._bucket(s, "tok", lim.tokens_per_minute, None, now).take(tokens, now=now)

    def standing(
        self, scope: Scope, *, now: float
    ) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """(level, seconds to full) of the scope's request and token buckets; ``None`` if unlimited."""
        lim = scope.limits
        req = tok = None
        if lim.requests_per_minute is not None:
            b = self._bucket(scope, "req", lim.requests_per_minute, lim.request_burst, now)
            req = (b.available(now=now), b.reset_in(now=now))
        if lim.tokens_per_minute is not None:
            b = self._bucket(scope, "tok", lim.tokens_per_minute, None, now)
            tok = (b.available(now=now), b.reset_in(now=now))
        return req, tok

    def headers(self, scopes: tuple[Scope, ...], *, now: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for ``scopes`` as they stand, taking nothing.

        Like OpenAI, report the tightest limit (the one a client will hit first).
        The same headers go on a success, a 429 and a quota refusal, so a client
        can pace itself from any answer.
        """
        reqs: list[tuple[float, int, float]] = []
        toks: list[tuple[float, int, float]] = []
        for s in scopes:
            lim = s.limits
            if lim.requests_per_minute is not None:
                b = self._bucket(s, "req", lim.requests_per_minute, lim.request_burst, now)
                reqs.append((b.available(now=now), lim.requests_per_minute, b.reset_in(now=now)))
            if lim.tokens_per_minute is not None:
                b = self._bucket(s, "tok", lim.tokens_per_minute, None, now)
                toks.append((b.available(now=now), lim.tokens_per_minute, b.reset_in(now=now)))
        return tightest_headers(reqs, toks)

    def settle(self, grant: RateGrant, actual_tokens: int, *, now: float) -> None:
        if grant.settled:
            return
        grant.settled = True
        for s in grant.scopes:
            lim = s.limits
            if lim.concurrent is not None:
                k = (s.kind, s.id)
                n = self._in_flight.get(k, 0) - 1
                if n > 0:
                    self._in_flight[k] = n
                else:
                    self._in_flight.pop(k, None)
            if lim.tokens_per_minute is not None:
                b = self._buckets.get((s.kind, s.id, "tok"))
                if b is not None:
                    b.give(grant.tokens - actual_tokens, now=now)


def tightest_headers(
    reqs: list[tuple[float, int, float]], toks: list[tuple[float, int, float]]
) -> dict[str, str]:
    """``x-ratelimit-*`` from (level, per-minute limit, seconds to full) of each bucket.

    Reports the bucket with the least left, like OpenAI: the one a client hits first.
    Every backend renders its buckets through this, so the headers match to the byte.
    """
    headers: dict[str, str] = {}
    if reqs:
        lvl, lim, reset = _least(reqs)
        headers["x-ratelimit-limit-requests"] = str(lim)
        headers["x-ratelimit-remaining-requests"] = str(max(0, math.floor(lvl)))
        headers["x-ratelimit-reset-requests"] = format_duration(reset)
    if toks:
        lvl, lim, reset = _least(toks)
        headers["x-ratelimit-limit-tokens"] = str(lim)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(lvl)))
        headers["x-ratelimit-reset-tokens"] = format_duration(reset)
    return headers


def _least(entries: list[tuple[float, int, float]]) -> tuple[float, int, float]:
    """The first entry with the lowest level (on the request path: no ``min(key=...)``)."""
    best = entries[0]
    for e in entries:
        if e[0] < best[0]:
            best = e
    return best


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    total = math.ceil(seconds)
    m, s = divmod(total, 60)
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
