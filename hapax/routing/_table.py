"""The route table: which deployments may serve a model now, and in what order.

A public name resolves to its model through the runtime's alias map (``aliases``); the model's
deployments are filtered by health (probe, breaker, 429 cool-down) and ordered by the model's
strategy (``_balancer``), untried ones first. ``Dispatcher`` (``_dispatch``) walks that order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._errors import NoHealthyUpstream
from .._metrics import GatewayMetrics
from ..config import Config, Deployment, ModelConfig
from ..state import GLOBAL, Slots
from ._balancer import Strategy, build_strategy
from ._health import DeploymentHealth, HealthStore, ProbeStatus

if TYPE_CHECKING:
    from ._runtime import Runtime

@dataclass(slots=True)
class _Candidate:
    """A deployment as the strategy sees it: config plus live counters."""

    dep: Deployment
    health: DeploymentHealth

    @property
    def key(self) -> str:
        return self.health.key

    @property
    def weight(self) -> float:
        return self.dep.weight

    @property
    def priority(self) -> int:
        return self.dep.priority

    @property
    def in_flight(self) -> int:
        return self.health.in_flight

    @property
    def latency(self) -> float | None:
        return self.health.latency

    @property
    def latency_at(self) -> float:
        return self.health.latency_at


def aliases(config: Config) -> dict[str, ModelConfig]:
    """Every public name (a model's name and each alias) to its model."""
    models: dict[str, ModelConfig] = {}
    for m in config.models:
        for public in (m.name, *m.aliases):
            models[public] = m
    return models


class Routes:
    """The choosing half of ``Dispatcher``."""

    # Set by ``Dispatcher.__init__``.
    metrics: GatewayMetrics
    health: HealthStore
    gate: Slots
    _clock: Callable[[], float]
    _rng: random.Random
    _generation: int
    _strategies: dict[str, Strategy]

    def sync(self, rt: Runtime) -> None:
        """Follow a newer config: deployments, limits, strategies, probes."""
        if rt.generation <= self._generation:
            return
        self._generation = rt.generation
        cfg = rt.config
        rel = cfg.reliability
        pairs = [(d.provider, d.model) for m in cfg.models for d in m.deployments]
        self.health.configure(
            breaker=rel.circuit_breaker,
            deployments=pairs,
            health_checks={name: p.health_check for name, p in cfg.providers.items()},
            now=self._clock(),
        )
        self.metrics.bind_deployments(f"{p}/{m}" for p, m in pairs)
        strategies: dict[str, Strategy] = {}
        for m in cfg.models:
            old = self._strategies.get(m.name)
            strategies[m.name] = old if old is not None and old.name == m.strategy else build_strategy(m.strategy)
        self._strategies = strategies
        self.gate.configure(queue_size=rel.admission.queue_size, limits=_limits(cfg))

    def _candidates(
        self,
        rt: Runtime,
        model: ModelConfig,
        now: float,
        skip: set[str],
        tried: dict[str, int],
        breakers_on: bool,
    ) -> list[_Candidate]:
        out: list[_Candidate] = []
        for dep in model.deployments:
            h = self.health.deployment(dep.provider, dep.model)
            if h.key in skip or dep.provider not in rt.providers:
                continue
            if self.health.provider(dep.provider).status is ProbeStatus.UNHEALTHY:
                continue
            if breakers_on and not h.breaker.available(now=now):
                continue
            out.append(_Candidate(dep, h))
        strategy = self._strategies.get(model.name)
        if strategy is None or strategy.name != model.strategy:
            # A request that began before a reload changed this model's strategy keeps its
            # own (its snapshot's), without the shared state of the new one.
            strategy = build_strategy(model.strategy)
        ordered = strategy.order(out, now=now, rng=self._rng)
        if tried:
            ordered.sort(key=lambda c: tried.get(c.key, 0))  # stable: strategy order within
        return ordered

    def _soonest(self, model: ModelConfig, now: float) -> float | None:
        """Seconds until a deployment of ``model`` may take calls again, if time alone will do it."""
        soonest: float | None = None
        for dep in model.deployments:
            if self.health.provider(dep.provider).status is ProbeStatus.UNHEALTHY:
                continue
            t = self.health.deployment(dep.provider, dep.model).breaker.next_deadline()
            if t is not None and t > now:
                soonest = t if soonest is None else min(soonest, t)
        return None if soonest is None else soonest - now

    def _no_upstream(self, model: ModelConfig, now: float) -> NoHealthyUpstream:
        why: list[str] = []
        soonest: float | None = None
        for dep in model.deployments:
            h = self.health.deployment(dep.provider, dep.model)
            if self.health.provider(dep.provider).status is ProbeStatus.UNHEALTHY:
                why.append(f"{h.key}: provider probe failing")
                continue
            b = h.breaker
            if now < b.cooling_until:
                why.append(f"{h.key}: cooling down after 429")
            else:
                why.append(f"{h.key}: circuit {b.state.value}")
            t = b.next_deadline()
            if t is not None and t > now:
                soonest = t if soonest is None else min(soonest, t)
        return NoHealthyUpstream(
            f"no healthy deployment for model '{model.name}' ({'; '.join(why)})",
            retry_after=max(1.0, (soonest - now) if soonest is not None else 1.0),
        )


def _limits(cfg: Config) -> dict[str, int]:
    limits: dict[str, int | None] = {GLOBAL: cfg.reliability.admission.max_concurrency}
    for m in cfg.models:
        limits["model:" + m.name] = m.max_concurrency
        for d in m.deployments:
            key = f"dep:{d.provider}/{d.model}"
            # One deployment may serve several models; the tightest limit wins.
            if d.max_concurrency is not None:
                old = limits.get(key)
                limits[key] = d.max_concurrency if old is None else min(old, d.max_concurrency)
            else:
                limits.setdefault(key, None)
    return {k: v for k, v in limits.items() if v is not None}
