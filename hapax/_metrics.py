"""Prometheus metrics with bounded labels, rendered in the text exposition format.

A small in-process registry rather than prometheus_client: the hot path only
does a dict lookup and an add, and every label value passes through a bound
(``LabelBound``) so a client cannot mint new series by sending odd model names.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

#: Seconds; spans 1 ms gateway overhead to multi-minute generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)
#: Gateway-added time is small; finer buckets where it matters.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)

OTHER = "other"

M = TypeVar("M", bound="_Metric")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def _labelstr(self, values: tuple[str, ...], extra: str = "") -> str:
        parts = [f'{k}="{_escape(v)}"' for k, v in zip(self.labels, values, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, by: float = 1.0) -> None:
        self._values[values] = self._values.get(values, 0.0) + by

    def get(self, *values: str) -> float:
        return self._values.get(values, 0.0)

    def render(self) -> Iterable[str]:
        yield from super().render()
        for values, v in sorted(self._values.items()):
            yield f"{self.name}{self._labelstr(values)} {_fmt(v)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, *values: str, to: float) -> None:
        self._values[values] = to

    def dec(self, *values: str, by: float = 1.0) -> None:
        self.inc(*values, by=-by)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *values: str) -> None:
        s = self._series.get(values)
        if s is None:
            # per-bucket counts, then +Inf count, then sum
            s = self._series[values] = [0.0] * (len(self.buckets) + 2)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-1] += value

    def count(self, *values: str) -> float:
        s = self._series.get(values)
        return sum(s[:-1]) if s else 0.0

    def render(self) -> Iterable[str]:
        yield from super().render()
        for values, s in sorted(self._series.items()):
            acc = 0.0
            for le, n in zip((*self.buckets, math.inf), s[:-1], strict=True):
                acc += n
                le_label = 'le="' + _fmt(le) + '"'
                yield f"{self.name}_bucket{self._labelstr(values, le_label)} {_fmt(acc)}"
            yield f"{self.name}_sum{self._labelstr(values)} {s[-1]!r}"
            yield f"{self.name}_count{self._labelstr(values)} {_fmt(acc)}"


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._collectors: list[Callable[[], None]] = []

    def add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def on_collect(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before each scrape, to refresh gauges that are cheaper to read than track."""
        self._collectors.append(fn)

    def render(self) -> bytes:
        for fn in self._collectors:
            fn()
        lines: list[str] = []
        for m in self._metrics:
            lines.extend(m.render())
        return ("\n".join(lines) + "\n").encode()


class LabelBound:
    """Admit only known label values; everything else is counted as ``other``."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed)

    def __call__(self, value: str | None) -> str:
        if not value:
            return "none"
        return value if value in self.allowed else OTHER


#: Why the front door closes a connection itself (hapax_connections_closed_total's ``reason``).
CONNECTION_CLOSE_REASONS = (
    "idle_evicted", "refused", "header_timeout", "body_timeout", "write_timeout", "shutdown",
)


class GatewayMetrics:
    """Every metric the gateway exports; names are the public contract (docs/metrics.md)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter(
            "hapax_requests_total", "Requests answered, by route, model, provider and status.",
            ("route", "model", "provider", "status"),
        ))
        self.request_duration = r.add(Histogram(
            "hapax_request_duration_seconds", "Total time from request received to last byte sent.",
            ("route",), buckets=LATENCY_BUCKETS,
        ))
        self.upstream_duration = r.add(Histogram(
            "hapax_upstream_duration_seconds", "Time spent waiting on the provider, per provider.",
            ("provider",), buckets=LATENCY_BUCKETS,
        ))
        self.gateway_overhead = r.add(Histogram(
            "hapax_gateway_overhead_seconds", "Time the gateway itself added (total minus upstream).",
            ("route",), buckets=OVERHEAD_BUCKETS,
        ))
        self.ttft = r.add(Histogram(
            "hapax_time_to_first_token_seconds", "Time from request received to first streamed token.",
            ("model", "provider"), buckets=LATENCY_BUCKETS,
        ))
        self.tokens = r.add(Counter(
            "hapax_tokens_total", "Tokens processed, by model, provider and direction (input|output).",
            ("model", "provider", "direction"),
        ))
        self.in_flight = r.add(Gauge(
            "hapax_requests_in_flight", "Requests being handled right now.",
        ))
        self.errors = r.add(Counter(
            "hapax_errors_total", "Errors returned to clients, by error type and code.",
            ("type", "code"),
        ))
        self.config_reloads = r.add(Counter(
            "hapax_config_reloads_total", "Config reload attempts by result (success|failure).",
            ("result",),
        ))
        self.config_info = r.add(Gauge(
            "hapax_config_generation", "Generation of the config in force; bumps on every reload.",
        ))
        # Access control (hapax._access): team labels come from config and keys, never from requests.
        self.auth_failures = r.add(Counter(
            "hapax_auth_failures_total", "Rejected credentials, by reason.", ("reason",),
        ))
        self.limited = r.add(Counter(
            "hapax_limited_total", "Calls refused by a rate limit, quota or budget, by scope kind and limit.",
            ("scope", "limit"),
        ))
        self.team_requests = r.add(Counter(
            "hapax_team_requests_total", "Model calls settled, by team and model.", ("team", "model"),
        ))
        self.team_tokens = r.add(Counter(
            "hapax_team_tokens_total", "Tokens charged, by team, model and direction (input|output).",
            ("team", "model", "direction"),
        ))
        self.cost = r.add(Counter(
            "hapax_cost_usd_total", "Cost charged in US dollars, by team and model.", ("team", "model"),
        ))
        # Reliability (hapax._dispatch): deployment labels are provider/model pairs from config.
        self.attempts = r.add(Counter(
            "hapax_upstream_attempts_total",
            "Upstream attempts by deployment and outcome (ok, or the error code).",
            ("deployment", "outcome"),
        ))
        self.retries = r.add(Counter(
            "hapax_retries_total", "Attempts after a request's first, by model.", ("model",),
        ))
        self.failovers = r.add(Counter(
            "hapax_failovers_total", "Retries that moved to a different deployment, by model.", ("model",),
        ))
        self.circuit_state = r.add(Gauge(
            "hapax_circuit_state", "Circuit breaker state per deployment: 0 closed, 1 half-open, 2 open.",
            ("deployment",),
        ))
        self.circuit_transitions = r.add(Counter(
            "hapax_circuit_transitions_total", "Circuit breaker state changes, by deployment and new state.",
            ("deployment", "to"),
        ))
        self.deployment_in_flight = r.add(Gauge(
            "hapax_deployment_in_flight", "Calls in flight per deployment.", ("deployment",),
        ))
        self.probes = r.add(Counter(
            "hapax_health_probes_total", "Active health probes, by provider and result (ok|fail).",
            ("provider", "result"),
        ))
        self.provider_healthy = r.add(Gauge(
            "hapax_provider_healthy", "Probe status per provider: 1 healthy, 0 unhealthy, -1 unknown.",
            ("provider",),
        ))
        self.queue_depth = r.add(Gauge(
            "hapax_queue_depth", "Requests waiting for a concurrency slot.",
        ))
        self.queue_wait = r.add(Histogram(
            "hapax_queue_wait_seconds", "Time requests waited for a concurrency slot.",
            buckets=LATENCY_BUCKETS,
        ))
        self.queue_rejections = r.add(Counter(
            "hapax_queue_rejections_total", "Requests turned away by admission, by reason.", ("reason",),
        ))
        self.deduplicated = r.add(Counter(
            "hapax_deduplicated_requests_total",
            "Requests answered by an identical concurrent request's upstream call, by model.",
            ("model",),
        ))
        # The front door (node.protocol): connections, not requests.
        self.connections_open = r.add(Gauge(
            "hapax_connections_open", "Client connections open right now.",
        ))
        self.connections_closed = r.add(Counter(
            "hapax_connections_closed_total",
            "Client connections the server closed on its own, by reason (a limit or a timeout).",
            ("reason",),
        ))
        self.http_protocol_errors = r.add(Counter(
            "hapax_http_protocol_errors_total", "Requests refused as malformed HTTP (bad request line or headers).",
        ))
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.inc(reason, by=0)
        self.http_protocol_errors.inc(by=0)
        self.connections_open.set(to=0)
        self.queue_depth.set(to=0)
        self.in_flight.set(to=0)
        self.config_info.set(to=0)
        self.models = LabelBound()
        self.providers = LabelBound()
        self.deployments = LabelBound()
        self.teams = LabelBound()

    def bind_config(self, model_names: Iterable[str], provider_names: Iterable[str]) -> None:
        """Labels follow the config: only configured models and providers get series."""
        self.models = LabelBound(model_names)
        self.providers = LabelBound(provider_names)

    def bind_deployments(self, keys: Iterable[str]) -> None:
        self.deployments = LabelBound(keys)

    def bind_teams(self, team_names: Iterable[str]) -> None:
        self.teams = LabelBound(team_names)
