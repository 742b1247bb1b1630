"""What routing knows, shown: the health JSON, the collected gauges, and breaker/probe transitions
as metrics and log lines."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..state import HealthNews, HealthNewsBus
from ._breaker import SHARED_OPENS, STATE_VALUE, BreakerState
from ._health import DeploymentHealth, ProbeStatus
from ._table import Routes

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("hapax.dispatch")


class HealthReport(Routes):
    """The reporting half of ``Dispatcher``: and what this node tells its peers, and hears from them."""

    # Set by ``Dispatcher.__init__``.
    news: HealthNewsBus
    retell_probes: bool

    def _flush(self, h: DeploymentHealth) -> None:
        for t in h.breaker.take_events():
            if t.trigger in SHARED_OPENS:
                self.news.tell(HealthNews("open", h.key, max(0.0, h.breaker.opened_until - t.at)))
            label = self.metrics.deployments(h.key)
            self.metrics.circuit_transitions.inc(label, t.new.value)
            level = logging.WARNING if t.new is BreakerState.OPEN else logging.INFO
            log.log(level, "circuit breaker " + t.new.value, extra={"fields": {
                "deployment": h.key, "from": t.old.value, "to": t.new.value, "trigger": t.trigger.value,
                "last_error": h.last_error}})

    def _on_probe(self, provider: str, ok: bool, error: str | None) -> None:
        now = self._clock()
        ph = self.health.provider(provider)
        self.metrics.probes.inc(self.metrics.providers(provider), "ok" if ok else "fail")
        if ph.tracker is None:
            return
        new = ph.tracker.record(ok, now=now, error=error)
        if new is None:
            if self.retell_probes and ph.tracker.status is not ProbeStatus.UNKNOWN:
                self.news.tell(HealthNews("probe", provider, status=ph.tracker.status.value))
            return
        log.log(logging.WARNING if new is ProbeStatus.UNHEALTHY else logging.INFO,
                "provider " + new.value, extra={"fields": {"provider": provider, "error": error}})
        self.news.tell(HealthNews("probe", provider, status=new.value))
        self._probe_changed(ph.deployments, new, now)

    def _probe_changed(self, deployments: list[DeploymentHealth], new: ProbeStatus, now: float) -> None:
        for h in deployments:
            if new is ProbeStatus.UNHEALTHY:
                h.breaker.probe_down(now=now)
            else:
                h.breaker.probe_up(now=now)
            self._flush(h)

    def _on_news(self, news: HealthNews) -> None:
        """A peer's news: applied to this node's own view (never told on)."""
        now = self._clock()
        if news.kind == "probe":
            ph = next((p for p in self.health.providers() if p.name == news.target), None)
            if ph is None or ph.tracker is None or ph.tracker.status.value == news.status:
                return
            new = ProbeStatus(news.status)
            ph.tracker.status = new
            log.info("provider " + new.value + " (a peer's probe)", extra={"fields": {"provider": news.target}})
            self._probe_changed(ph.deployments, new, now)
            return
        h = next((d for d in self.health.deployments() if d.key == news.target), None)
        if h is None:
            return  # a deployment this node's config does not name
        if news.kind == "open":
            h.breaker.peer_open(news.seconds, now=now)
            self._flush(h)
        else:
            h.breaker.cool_down(news.seconds, now=now)
            log.info("deployment cooling down (a peer's 429)", extra={"fields": {
                "deployment": h.key, "seconds": round(news.seconds, 3)}})

    def _collect(self) -> None:
        m = self.metrics
        m.queue_depth.set(to=self.gate.waiting)
        for h in self.health.deployments():
            label = m.deployments(h.key)
            h.breaker.poll(now=self._clock())
            self._flush(h)
            m.circuit_state.set(label, to=STATE_VALUE[h.breaker.state])
            m.deployment_in_flight.set(label, to=h.in_flight)
        for ph in self.health.providers():
            value = {ProbeStatus.HEALTHY: 1, ProbeStatus.UNHEALTHY: 0}.get(ph.status, -1)
            m.provider_healthy.set(m.providers(ph.name), to=value)

    def snapshot(self, rt: Runtime) -> dict[str, Any]:
        """Each provider's and deployment's state, for /health/ready and /v1/health/providers."""
        self.sync(rt)
        now = self._clock()
        users: dict[str, list[str]] = {}
        for m in rt.config.models:
            for dep in m.deployments:
                users.setdefault(f"{dep.provider}/{dep.model}", []).append(m.name)
        deployments = []
        for h in self.health.deployments():
            b = h.breaker
            b.poll(now=now)
            self._flush(h)
            calls, failures = b.failure_counts(now=now)
            state = b.state.value
            if now < b.cooling_until:
                state = "cooling_down"
            deployments.append({
                "deployment": h.key,
                "provider": h.provider,
                "model": h.model,
                "models": users.get(h.key, []),
                "state": state,
                "breaker": b.state.value,
                "available": b.available(now=now)
                and self.health.provider(h.provider).status is not ProbeStatus.UNHEALTHY,
                "open_remaining_s": round(max(0.0, b.opened_until - now), 3) if b.state is BreakerState.OPEN else 0,
                "cooldown_remaining_s": round(max(0.0, b.cooling_until - now), 3),
                "consecutive_failures": b.consecutive,
                "window_calls": calls,
                "window_failures": failures,
                "in_flight": h.in_flight,
                "latency_ewma_ms": round(h.latency * 1000, 3) if h.latency is not None else None,
                "successes": h.successes,
                "failures": h.failures,
                "last_error": h.last_error,
            })
        providers = {}
        for name in rt.config.providers:
            ph = self.health.provider(name)
            t = ph.tracker
            built = rt.providers.get(name)
            providers[name] = {
                "type": rt.config.providers[name].type,
                "probe": ph.status.value if t is not None else "disabled",
                "last_probe_error": t.last_error if t is not None else None,
                # Set while calls find the API missing at base_url (a misplaced /v1, say).
                "misconfigured": built.misconfigured if built is not None else None,
                "deployments": sorted(h.key for h in ph.deployments),
            }
        return {
            "providers": providers,
            "deployments": sorted(deployments, key=lambda d: str(d["deployment"])),
            "queue": {"waiting": self.gate.waiting},
        }
