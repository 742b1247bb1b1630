"""Load-balancing strategies: in what order to try a model's deployments.

Theory of operation: a model's config names a strategy (``strategy: failover``).
For each request the dispatcher hands the strategy the deployments that may be
called now (breaker not open, probe not failing, not cooling down) and gets
back all of them, ordered: the first is tried first, the rest are the failover
order. Strategies are pure: they read the candidates' counters and the ``now``
and ``rng`` they are given, and keep at most a little state of their own (the
round-robin cursor).

- ``failover``: by ``priority`` (lowest first), config order within a priority.
- ``weighted``: a weighted random order (sampling without replacement).
- ``round_robin``: rotate the start over the list, one step per request.
- ``least_in_flight``: fewest calls in flight per unit of weight first.
- ``latency``: lowest EWMA of time to first byte first. A deployment with no
  sample, or a sample older than ``LATENCY_STALE_AFTER``, goes first so it
  gets measured; and with probability ``LATENCY_EXPLORE`` a random one leads,
  so a deployment that was slow once (or failed and recovered) is tried again.

Add one with ``register_strategy(name, factory)``; config validation accepts
any registered name.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

#: Share of requests that lead with a random deployment under ``latency``: enough to
#: notice a recovery within a few dozen requests, small enough not to hurt p50.
LATENCY_EXPLORE = 0.05
#: A latency sample older than this says little about now; re-measure.
LATENCY_STALE_AFTER = 60.0
#: Weight of the newest sample in the EWMA: about the last 5 samples matter.
EWMA_ALPHA = 0.3


class Candidate(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def priority(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def latency(self) -> float | None: ...
    @property
    def latency_at(self) -> float: ...


C = TypeVar("C", bound=Candidate)


def ewma(previous: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)


class Strategy(ABC):
    name: str = ""

    @abstractmethod
    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        """All of ``candidates``, in the order to try them."""


class Failover(Strategy):
    name = "failover"

    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        return sorted(candidates, key=lambda c: c.priority)


class WeightedRandom(Strategy):
    name = "weighted"

    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        # Efraimidis-Spirakis: sort by u^(1/w); the same as drawing without replacement.
        return sorted(candidates, key=lambda c: -(rng.random() ** (1.0 / c.weight)))


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        if not candidates:
            return []
        start = self._next % len(candidates)
        self._next += 1
        return [*candidates[start:], *candidates[:start]]


class LeastInFlight(Strategy):
    name = "least_in_flight"

    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        # A random tie-break spreads an idle start instead of piling onto the first.
        return sorted(candidates, key=lambda c: (c.in_flight / c.weight, c.priority, rng.random()))


class LowestLatency(Strategy):
    name = "latency"

    def order(self, candidates: Sequence[C], *, now: float, rng: random.Random) -> list[C]:
        def score(c: C) -> tuple[int, float]:
            if c.latency is None or now - c.latency_at > LATENCY_STALE_AFTER:
                return (0, rng.random())
            return (1, c.latency)

        ranked = sorted(candidates, key=score)
        if len(ranked) > 1 and rng.random() < LATENCY_EXPLORE:
            lead = ranked.pop(rng.randrange(len(ranked)))
            ranked.insert(0, lead)
        return ranked


STRATEGIES: dict[str, Callable[[], Strategy]] = {}


def register_strategy(name: str, factory: Callable[[], Strategy]) -> None:
    if name in STRATEGIES:
        raise RuntimeError(f"strategy {name!r} registered twice")
    STRATEGIES[name] = factory


def build_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise RuntimeError(f"no strategy named {name!r}") from None


for _cls in (Failover, WeightedRandom, RoundRobin, LeastInFlight, LowestLatency):
    register_strategy(_cls.name, _cls)
