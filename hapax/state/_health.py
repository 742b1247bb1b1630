"""The provider-health seam: what one node learns about an upstream, told to the others.

Theory of operation: each node keeps its own health view (breakers, cool-downs,
probe verdicts; ``hapax.routing``'s ``HealthStore``), read on every request, so
it stays in process. What crosses between nodes is *news*, sent only when the
view changes, never per request: a deployment's breaker opened (for how long),
a deployment cools down after a 429 (for how long), a provider's probe verdict
changed. Times travel as seconds left, never as clock readings, so nodes'
clocks need not agree. Each node applies its peers' news to its own view.

``HealthNews`` is the seam; ``LocalHealthNews`` (one node, nobody to tell) is the
memory backend, ``RedisHealthNews`` (``_health_redis``) the shared one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

NewsKind = Literal["open", "cooldown", "probe"]


@dataclass(frozen=True, slots=True)
class HealthNews:
    kind: NewsKind
    #: A deployment (``provider/model``) for open and cooldown; a provider for probe.
    target: str
    #: Seconds left open or cooling down; 0 for probe.
    seconds: float = 0.0
    #: The probe verdict: healthy or unhealthy.
    status: str = ""


class HealthNewsBus(ABC):
    #: Called with each peer's news, on the event loop.
    on_news: Callable[[HealthNews], None] | None = None

    @abstractmethod
    def tell(self, news: HealthNews) -> None:
        """Send ``news`` to the peers; never waits (committed when called)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start listening; news still in force is replayed through ``on_news``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop listening."""


class LocalHealthNews(HealthNewsBus):
    """One node: its own view is the whole truth, and there is no one to tell."""

    def tell(self, news: HealthNews) -> None:
        return None
