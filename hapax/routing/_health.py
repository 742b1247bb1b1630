"""Deployment and provider health: what routing knows about each upstream.

Theory of operation: a *deployment* is one provider serving one upstream model
(``provider/model``); that is what breaks, so breakers, in-flight counts and
the latency EWMA are per deployment, shared by every public model and alias
that uses it. Probes are per *provider*: one cheap request says whether the
endpoint answers at all.

``ProbeTracker`` is a pure core: probe results in, status out, thresholds
applied through a transition table. Status starts UNKNOWN (routable: no news
is not bad news), becomes UNHEALTHY after ``unhealthy_threshold`` failures in
a row and HEALTHY after ``healthy_threshold`` successes in a row. Its
transitions feed the breakers of the provider's deployments (see
``hapax.routing._breaker``) and routing skips deployments of an UNHEALTHY provider.

``HealthStore`` is the state contract (DESIGN §4). Breakers stay per node in
every backend, as Envoy's outlier detection does: each node judges what it
sees itself, and a breaker is read on every request, so it must be local. What
a cluster shares is probe status, which the leader writes and every node
reads; a Redis backend implements ``provider()`` from there. The memory
backend here keeps both in dicts.

``Prober`` is the thin async adapter: one task, probing each provider whose
``health_check`` is enabled when it is due, every wait bounded by the probe's
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from ..config import BreakerConfig, HealthCheckConfig
from ._breaker import CircuitBreaker

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("hapax.health")

#: The prober wakes at least this often, so a reload that enables probes takes effect.
PROBER_MAX_SLEEP = 1.0


class ProbeStatus(Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


_U, _OK, _BAD = ProbeStatus.UNKNOWN, ProbeStatus.HEALTHY, ProbeStatus.UNHEALTHY

#: (status, probe passed?) -> status once the matching threshold is reached.
PROBE_TRANSITIONS: dict[tuple[ProbeStatus, bool], ProbeStatus] = {
    (_U, True): _OK,
    (_U, False): _BAD,
    (_OK, False): _BAD,
    (_BAD, True): _OK,
}


class ProbeTracker:
    def __init__(self, config: HealthCheckConfig, *, now: float) -> None:
        self.config = config
        self.status = ProbeStatus.UNKNOWN
        self.streak = 0
        self.streak_ok = True
        self.next_due = now
        self.last_at: float | None = None
        self.last_error: str | None = None

    def record(self, ok: bool, *, now: float, error: str | None = None) -> ProbeStatus | None:
        """Take one probe result; return the new status if it changed."""
        self.last_at = now
        self.last_error = None if ok else error
        self.next_due = now + self.config.interval
        if ok != self.streak_ok:
            self.streak_ok, self.streak = ok, 0
        self.streak += 1
        threshold = self.config.healthy_threshold if ok else self.config.unhealthy_threshold
        new = PROBE_TRANSITIONS.get((self.status, ok))
        if new is None or self.streak < threshold:
            return None
        self.status = new
        return new


@dataclass(eq=False)
class DeploymentHealth:
    key: str
    provider: str
    model: str
    breaker: CircuitBreaker
    in_flight: int = 0
    #: EWMA of time to first byte, seconds; ``None`` before the first sample.
    latency: float | None = None
    latency_at: float = 0.0
    successes: int = 0
    failures: int = 0
    last_error: str | None = None


@dataclass(eq=False)
class ProviderHealth:
    name: str
    tracker: ProbeTracker | None = None
    deployments: list[DeploymentHealth] = field(default_factory=list)

    @property
    def status(self) -> ProbeStatus:
        return self.tracker.status if self.tracker is not None else ProbeStatus.UNKNOWN


def deployment_key(provider: str, model: str) -> str:
    return f"{provider}/{model}"


class HealthStore(ABC):
    @abstractmethod
    def deployment(self, provider: str, model: str) -> DeploymentHealth: ...

    @abstractmethod
    def provider(self, name: str) -> ProviderHealth: ...

    @abstractmethod
    def deployments(self) -> Iterable[DeploymentHealth]: ...

    @abstractmethod
    def providers(self) -> Iterable[ProviderHealth]: ...

    @abstractmethod
    def configure(
        self,
        *,
        breaker: BreakerConfig,
        deployments: Iterable[tuple[str, str]],
        health_checks: dict[str, HealthCheckConfig],
        now: float,
    ) -> None:
        """Follow a new config: known deployments and providers, breaker settings."""


class MemoryHealthStore(HealthStore):
    def __init__(self) -> None:
        self._deployments: dict[str, DeploymentHealth] = {}
        self._providers: dict[str, ProviderHealth] = {}
        self._breaker = BreakerConfig()

    def deployment(self, provider: str, model: str) -> DeploymentHealth:
        key = deployment_key(provider, model)
        d = self._deployments.get(key)
        if d is None:
            d = self._deployments[key] = DeploymentHealth(key, provider, model, CircuitBreaker(self._breaker))
            self.provider(provider).deployments.append(d)
        return d

    def provider(self, name: str) -> ProviderHealth:
        p = self._providers.get(name)
        if p is None:
            p = self._providers[name] = ProviderHealth(name)
        return p

    def deployments(self) -> Iterable[DeploymentHealth]:
        return self._deployments.values()

    def providers(self) -> Iterable[ProviderHealth]:
        return self._providers.values()

    def configure(
        self,
        *,
        breaker: BreakerConfig,
        deployments: Iterable[tuple[str, str]],
        health_checks: dict[str, HealthCheckConfig],
        now: float,
    ) -> None:
        wanted = {deployment_key(p, m): (p, m) for p, m in deployments}
        # Forget what the config no longer names, so nothing grows across reloads.
        for key in list(self._deployments):
            if key not in wanted:
                del self._deployments[key]
        for name in list(self._providers):
            if name not in health_checks:
                del self._providers[name]
        for ph in self._providers.values():
            ph.deployments = [d for d in ph.deployments if d.key in wanted]
        if breaker != self._breaker:
            self._breaker = breaker
            for d in self._deployments.values():
                d.breaker = CircuitBreaker(breaker)
        for prov, model in wanted.values():
            self.deployment(prov, model)
        for name, hc in health_checks.items():
            ph = self.provider(name)
            if not hc.enabled:
                ph.tracker = None
            elif ph.tracker is None or ph.tracker.config != hc:
                ph.tracker = ProbeTracker(hc, now=now)


ProbeReport = Callable[[str, bool, "str | None"], None]


class Prober:
    """Runs due probes; reports each result through ``report(provider, ok, error)``."""

    def __init__(
        self,
        store: HealthStore,
        runtime: Callable[[], Runtime],
        report: ProbeReport,
        *,
        clock: Callable[[], float] = time.monotonic,
        active: Callable[[], bool] | None = None,
    ) -> None:
        """``active`` gates the probes: in a cluster only the leader probes (``node.cluster``)."""
        self._store = store
        self._runtime = runtime
        self._report = report
        self._clock = clock
        self._active = active
        # Set by ``wake`` when the gate may have opened (leadership came): a follower sleeps on it.
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hapax-prober")

    def wake(self) -> None:
        """Look at the gate now (a follower just became the leader), not at the next check."""
        self._woken.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            if self._active is not None and not self._active():
                # A follower: sleep until woken by a change of leadership; the bounded wait is a
                # safety net for a gate that opens without a wake.
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), PROBER_MAX_SLEEP)
                continue
            now = self._clock()
            rt = self._runtime()
            due = [
                p for p in self._store.providers()
                if p.tracker is not None and p.tracker.next_due <= now and p.name in rt.providers
            ]
            if due:
                await asyncio.gather(*(self._probe_one(rt, p) for p in due))
            wake = [p.tracker.next_due for p in self._store.providers() if p.tracker is not None]
            delay = min(wake, default=now + PROBER_MAX_SLEEP) - self._clock()
            await asyncio.sleep(min(max(delay, 0.01), PROBER_MAX_SLEEP))

    async def _probe_one(self, rt: Runtime, ph: ProviderHealth) -> None:
        tracker = ph.tracker
        assert tracker is not None
        provider = rt.providers[ph.name]
        cfg = tracker.config
        # Mark it not due before awaiting, so a slow probe is never started twice.
        tracker.next_due = self._clock() + cfg.interval
        error: str | None = None
        try:
            async with asyncio.timeout(cfg.timeout):
                await provider.probe(timeout=cfg.timeout, prompt_model=cfg.model if cfg.mode == "prompt" else None)
        except TimeoutError:
            error = f"probe timed out after {cfg.timeout}s"
        except Exception as exc:  # any failure is a failed probe; the prober must live on
            error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        self._report(ph.name, error is None, error)
