"""Prometheus metrics with bounded labels, rendered in the text exposition format.

A small in-process registry rather than prometheus_client: the hot path only
does a dict lookup and an add, and every label value passes through a bound
(``LabelBound``) so a client cannot mint new series by sending odd model names.
"""

from __future__ import annotations

import bisect
import gc
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ._errors import (
    HapaxError,
    InternalError,
    NoHealthyUpstream,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

#: Seconds; spans 1 ms gateway overhead to multi-minute generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)
#: Gateway-added time is small; finer buckets where it matters.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)

#: GC pauses: a young collection takes well under a millisecond, a full one on a big heap 100+ ms.
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

OTHER = "other"

#: Routes that call a model; ``route`` is always one of these or of ``_routes._route_name``'s.
MODEL_ROUTES = ("chat_completions", "completions", "embeddings", "messages")
#: Statuses a model call ends with often enough to alert on: their series exist at 0 from start-up.
ZERO_STATUSES = ("200", "429", "499", "500", "502", "503", "504")
#: Errors worth an alert on a model route (upstream trouble, limits, bugs): present at 0 likewise.
ZERO_ERRORS: tuple[type[HapaxError], ...] = (
    RateLimited, QuotaExceeded, UpstreamError, UpstreamBadRequest, UpstreamRateLimited,
    UpstreamUnavailable, UpstreamTimeout, NoHealthyUpstream, ServiceUnavailable, InternalError,
)
#: Upstream attempt outcomes present at 0 per deployment: ok and the upstream error codes.
ZERO_OUTCOMES = ("ok", *sorted({e.code for e in ZERO_ERRORS if issubclass(e, UpstreamError)}))
AUTH_REASONS = ("missing", "unknown", "revoked", "expired")
LIMIT_SCOPES = ("key", "team", "global")
LIMITS = (
    "requests_per_minute", "tokens_per_minute", "concurrent",
    "daily_tokens", "monthly_tokens", "daily_usd", "monthly_usd",
)
BREAKER_STATES = ("closed", "half_open", "open")
QUEUE_REJECTIONS = ("queue_full", "queue_timeout")


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` or ``5xx`` (499, the client hanging up, is a 4xx)."""
    return _CLASSES.get(status // 100, "other")


_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

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

    def zero(self, *values: str) -> None:
        """Make the series exist (at 0 if new), so it is scraped before its first event."""
        self._values.setdefault(values, 0.0)

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

    def zero(self, *values: str) -> None:
        """Make the series exist (empty if new)."""
        if values not in self._series:
            self._series[values] = [0.0] * (len(self.buckets) + 2)

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
            "hapax_request_duration_seconds",
            "Total time from request received to last byte sent, by route, model and status class.",
            ("route", "model", "status_class"), buckets=LATENCY_BUCKETS,
        ))
        self.upstream_duration = r.add(Histogram(
            "hapax_upstream_duration_seconds",
            "Time spent waiting on the provider, per provider and deployment (provider/model).",
            ("provider", "deployment"), buckets=LATENCY_BUCKETS,
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
        self.degraded = r.add(Gauge(
            "hapax_degraded", "1 while a shared-state dependency is unreachable and its failure policy applies.",
            ("dependency",),
        ))
        self.errors = r.add(Counter(
            "hapax_errors_total", "Errors returned to clients, by route, model, error type and code.",
            ("route", "model", "type", "code"),
        ))
        self.config_reloads = r.add(Counter(
            "hapax_config_reloads_total", "Config reload attempts by result (success|failure).",
            ("result",),
        ))
        self.config_info = r.add(Gauge(
            "hapax_config_generation", "Generation of the config in force; bumps on every reload.",
        ))
        self.config_revision = r.add(Gauge(
            "hapax_config_revision",
            "Revision of the config snapshot in force, as its source numbers it; bumps once per applied change.",
        ))
        # Access control (hapax.access): team labels come from config and keys, never from requests.
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
        # Reliability (hapax.routing._dispatch): deployment labels are provider/model pairs from config.
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
        self.log_lines_dropped = r.add(Counter(
            "hapax_log_lines_dropped_total",
            "Log lines dropped because stderr did not keep up (the node's writer).",
        ))
        self.audit_dropped = r.add(Counter(
            "hapax_audit_events_dropped_total",
            "Audit events dropped because the audit directory did not keep up (its queue was full).",
        ))
        self.build_info = r.add(Gauge(
            "hapax_build_info", "Always 1; the labels say which Hapax and Python run.", ("version", "python"),
        ))
        self._process = _ProcessMetrics(r)
        self.queue_depth.set(to=0)
        self.in_flight.set(to=0)
        self.config_info.set(to=0)
        self.log_lines_dropped.zero()
        self.audit_dropped.zero()
        self.config_revision.set(to=0)
        for result in ("success", "failure"):
            self.config_reloads.zero(result)
        for reason in AUTH_REASONS:
            self.auth_failures.zero(reason)
        for scope in LIMIT_SCOPES:
            for limit in LIMITS:
                self.limited.zero(scope, limit)
        for reason in QUEUE_REJECTIONS:
            self.queue_rejections.zero(reason)
        from ._version import __version__

        self.build_info.set(__version__, platform.python_version(), to=1)
        self.models = LabelBound()
        self.providers = LabelBound()
        self.deployments = LabelBound()
        self.teams = LabelBound()
        self._served: tuple[tuple[str, str], ...] = ()

    def bind_config(
        self,
        model_names: Iterable[str],
        provider_names: Iterable[str],
        served: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Labels follow the config: only configured models and providers get series.

        ``served`` is the (model, provider) pairs of the deployments: their counters are
        created at 0 now, so dashboards and alerts see a zero rather than no data.
        """
        self.models = LabelBound(model_names)
        self.providers = LabelBound(provider_names)
        self._served = tuple(served)
        for model, provider in self._served:
            for route in MODEL_ROUTES:
                for status in ZERO_STATUSES:
                    self.requests.zero(route, model, provider, status)
            for direction in ("input", "output"):
                self.tokens.zero(model, provider, direction)
        for model in {m for m, _ in self._served}:
            self.retries.zero(model)
            self.failovers.zero(model)
            self.deduplicated.zero(model)
            for route in MODEL_ROUTES:
                for err in ZERO_ERRORS:
                    self.errors.zero(route, model, err.type, err.code)
        for provider in self.providers.allowed:
            for result in ("ok", "fail"):
                self.probes.zero(provider, result)
        self._zero_teams()

    def bind_deployments(self, keys: Iterable[str]) -> None:
        self.deployments = LabelBound(keys)
        for key in self.deployments.allowed:
            for outcome in ZERO_OUTCOMES:
                self.attempts.zero(key, outcome)
            for state in BREAKER_STATES:
                self.circuit_transitions.zero(key, state)

    def bind_teams(self, team_names: Iterable[str]) -> None:
        self.teams = LabelBound(team_names)
        self._zero_teams()

    def _zero_teams(self) -> None:
        models = {m for m, _ in self._served}
        for team in self.teams.allowed:
            for model in models:
                self.team_requests.zero(team, model)
                self.cost.zero(team, model)
                for direction in ("input", "output"):
                    self.team_tokens.zero(team, model, direction)


class _GCStats:
    """Collections and their pauses per generation, from one process-wide ``gc.callbacks`` hook.

    Installed once however many registries exist; costs two clock reads per collection.
    """

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.collected = [0, 0, 0]
        self.pauses: list[list[float]] = [[] for _ in range(3)]  # drained into histograms per scrape
        self._t0 = 0.0
        gc.callbacks.append(self._hook)

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g = info["generation"]
        self.collections[g] += 1
        self.collected[g] += info["collected"]
        pauses = self.pauses[g]
        if len(pauses) < 10_000:  # bounded between scrapes
            pauses.append(time.perf_counter() - self._t0)


_gc_stats: _GCStats | None = None


def _gc() -> _GCStats:
    global _gc_stats
    if _gc_stats is None:
        _gc_stats = _GCStats()
    return _gc_stats


#: Close enough to the process start: this module is imported while the node starts.
_STARTED = time.time()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _ProcessMetrics:
    """Prometheus' standard ``process_*`` and ``python_gc_*`` series, read at scrape time."""

    def __init__(self, r: Registry) -> None:
        self.cpu = r.add(Counter("process_cpu_seconds_total", "User and system CPU time spent, in seconds."))
        self.rss = r.add(Gauge("process_resident_memory_bytes", "Resident memory size in bytes."))
        self.fds = r.add(Gauge("process_open_fds", "Open file descriptors."))
        self.max_fds = r.add(Gauge("process_max_fds", "Soft limit on open file descriptors."))
        self.start = r.add(Gauge("process_start_time_seconds", "Start time of the process, Unix seconds."))
        self.gc_collections = r.add(Counter(
            "python_gc_collections_total", "Garbage collections, by generation.", ("generation",),
        ))
        self.gc_collected = r.add(Counter(
            "python_gc_objects_collected_total", "Objects the collector freed, by generation.", ("generation",),
        ))
        self.gc_pause = r.add(Histogram(
            "python_gc_pause_seconds", "Time the collector stopped the process, by generation.",
            ("generation",), buckets=GC_BUCKETS,
        ))
        self.gc_frozen = r.add(Gauge(
            "python_gc_frozen_objects", "Objects gc.freeze() moved out of the collector's reach.",
        ))
        self._gc = _gc()
        self._pauses_seen: list[list[float]] = []
        self.start.set(to=round(_STARTED, 3))
        r.on_collect(self.collect)
        self.collect()

    def collect(self) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu._values[()] = ru.ru_utime + ru.ru_stime
        try:
            with open("/proc/self/statm", "rb") as f:
                self.rss.set(to=int(f.read().split()[1]) * _PAGE)
            self.fds.set(to=len(os.listdir("/proc/self/fd")))
        except OSError:  # not Linux: resident size from getrusage (peak, KiB), no fd count
            self.rss.set(to=ru.ru_maxrss * 1024)
        self.max_fds.set(to=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.gc_frozen.set(to=gc.get_freeze_count())
        st = self._gc
        for g in range(3):
            label = str(g)
            self.gc_collections._values[(label,)] = st.collections[g]
            self.gc_collected._values[(label,)] = st.collected[g]
            pauses, st.pauses[g] = st.pauses[g], []
            self.gc_pause.zero(label)
            for p in pauses:
                self.gc_pause.observe(p, label)
