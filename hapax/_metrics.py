"""Prometheus metrics with bounded labels, exposed through ``prometheus_client``.

Theory of operation: the hot path counts into small in-process structures (a
dict lookup and an add per event; every label value passes through a bound,
``LabelBound``, so a client cannot mint new series by sending odd model names).
Nothing on the request path touches ``prometheus_client``. At scrape time
``Exposition`` turns those values into the library's metric families, so the
text format, escaping, OpenMetrics negotiation (the ``Accept`` header) and the
process and GC collectors are the library's.

Several worker processes serve one port: each can hand the others a plain-data
``snapshot`` of its values, and the scraped worker merges them into the node's
totals (counters and histograms add up; a gauge says how in its ``merge``).
Per-process series (``process_*``, ``python_*``) are not added up: with more
than one worker each worker's series carry a ``worker`` label.
"""

from __future__ import annotations

import bisect
import gc
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

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
#: How a gauge's values from several workers make the node's: add up, or the largest / smallest.
Merge = Literal["sum", "max", "min"]
#: One worker's values of one metric: ``[[label values], value]`` (a histogram: its series list).
Values = list[list[Any]]


def _fmt(v: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``; no ``.0`` on whole numbers)."""
    if v == float("inf"):
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

    def copy(self) -> dict[tuple[str, ...], Any]:
        """The values now, detached from the live ones (taken on the event loop)."""
        raise NotImplementedError

    def family(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> Metric:
        """The library's family for this metric, from one or more workers' values."""
        raise NotImplementedError


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

    def copy(self) -> dict[tuple[str, ...], Any]:
        return self._values.copy()

    def _merged(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> dict[tuple[str, ...], float]:
        if len(parts) == 1:
            return dict(parts[0])
        out: dict[tuple[str, ...], float] = {}
        for part in parts:
            for k, v in part:
                out[k] = out.get(k, 0.0) + v
        return out

    def family(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> Metric:
        f = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for k, v in sorted(self._merged(parts).items()):
            f.add_metric(k, v)
        return f


class Gauge(Counter):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), *, merge: Merge = "sum") -> None:
        super().__init__(name, help, labels)
        self.merge: Merge = merge

    def set(self, *values: str, to: float) -> None:
        self._values[values] = to

    def dec(self, *values: str, by: float = 1.0) -> None:
        self.inc(*values, by=-by)

    def _merged(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> dict[tuple[str, ...], float]:
        if self.merge == "sum":
            return super()._merged(parts)
        pick = max if self.merge == "max" else min
        out: dict[tuple[str, ...], float] = {}
        for part in parts:
            for k, v in part:
                out[k] = pick(out[k], v) if k in out else v
        return out

    def family(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> Metric:
        f = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for k, v in sorted(self._merged(parts).items()):
            f.add_metric(k, v)
        return f


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)
        self._les = [_fmt(b) for b in self.buckets] + ["+Inf"]
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

    def copy(self) -> dict[tuple[str, ...], Any]:
        return {k: s.copy() for k, s in self._series.items()}

    def family(self, parts: Sequence[Iterable[tuple[tuple[str, ...], Any]]]) -> Metric:
        merged: dict[tuple[str, ...], list[float]] = {}
        for part in parts:
            for k, s in part:
                acc = merged.get(k)
                if acc is None:
                    merged[k] = list(s)
                elif len(acc) == len(s):  # same buckets: every worker runs the same code
                    for i, n in enumerate(s):
                        acc[i] += n
        f = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for k, s in sorted(merged.items()):
            cumulative, buckets = 0.0, []
            for le, n in zip(self._les, s[:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            f.add_metric(k, buckets, s[-1])
        return f


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

    def refresh(self) -> None:
        for fn in self._collectors:
            fn()

    def freeze(self) -> Frozen:
        """Every metric's values now. Cheap (dict copies), so it runs on the event loop; what
        is built from the copy (``families``, ``plain``) may then run in a thread."""
        self.refresh()
        return [(m, m.copy()) for m in self._metrics]


#: A registry's values at one moment: each metric with a copy of its series.
Frozen = list[tuple[_Metric, dict[tuple[str, ...], Any]]]


def families(frozen: Frozen, peers: Sequence[dict[str, Values]] = ()) -> Iterator[Metric]:
    """The library's families of ``frozen``, each series added up with ``peers``' (plain data)."""
    for m, own in frozen:
        parts: list[Iterable[tuple[tuple[str, ...], Any]]] = [own.items()]
        for peer in peers:
            parts.append((tuple(k), v) for k, v in peer.get(m.name, ()))
        yield m.family(parts)


def plain(frozen: Frozen) -> dict[str, Values]:
    """``frozen`` as plain data (lists, strings, floats), for a sibling worker."""
    return {m.name: [[list(k), v] for k, v in own.items()] for m, own in frozen}


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
            "hapax_requests_total", "Requests answered, by route, model, provider, status and protocol (h1|h3).",
            ("route", "model", "provider", "status", "protocol"),
        ))
        self.request_duration = r.add(Histogram(
            "hapax_request_duration_seconds",
            "Total time from request received to last byte sent, by route, model, status class and protocol.",
            ("route", "model", "status_class", "protocol"), buckets=LATENCY_BUCKETS,
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
        self.redis_round_trip = r.add(Histogram(
            "hapax_redis_round_trip_seconds",
            "Shared state's round trips to Redis, from the write to the last reply; each carries every "
            "operation one event-loop iteration queued.",
            buckets=OVERHEAD_BUCKETS,
        ))
        self.redis_operations = r.add(Counter(
            "hapax_redis_operations_total",
            "Shared-state operations sent to Redis (reservations, settlements, slot, dedup and health calls).",
        ))
        self.degraded = r.add(Gauge(
            "hapax_degraded", "1 while a shared-state dependency is unreachable and its failure policy applies.",
            ("dependency",), merge="max",  # across workers: degraded if any worker is
        ))
        self.errors = r.add(Counter(
            "hapax_errors_total", "Errors returned to clients, by route, model, error type and code.",
            ("route", "model", "type", "code"),
        ))
        self.config_reloads = r.add(Counter(
            "hapax_config_reloads_total", "Config reload attempts by result (success|failure).",
            ("result",),
        ))
        self.reloads = r.add(Counter(
            "hapax_reloads_total",
            "Reloads of mounted credentials and certificates, by trigger (signal|cluster) and result "
            "(success|failure).",
            ("trigger", "result"),
        ))
        self.config_info = r.add(Gauge(
            "hapax_config_generation", "Generation of the config in force; bumps on every reload.",
            merge="max",
        ))
        self.config_revision = r.add(Gauge(
            "hapax_config_revision",
            "Revision of the config snapshot in force, as its source numbers it; bumps once per applied change.",
            merge="min",  # across workers: the one that lags (a sum of revisions means nothing)
        ))
        # Cluster mode (coordinator, node.cluster): series only on a node started with --etcd.
        self.cluster_leader = r.add(Gauge(
            "hapax_cluster_leader", "1 while this node (any of its workers) is the cluster leader.", merge="max",
        ))
        self.cluster_nodes = r.add(Gauge(
            "hapax_cluster_nodes", "Members of the cluster (nodes, or workers of nodes) this node sees.",
            merge="max",
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
            ("deployment",), merge="max",  # across workers: the worst
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
            ("provider",), merge="min",  # across workers: the worst
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
        # The HTTP/3 front door (node.http3): QUIC handshakes, 0-RTT and migrations.
        self.http3_handshakes = r.add(Counter(
            "hapax_http3_handshakes_total", "QUIC handshakes completed, by kind (full|resumed).", ("kind",),
        ))
        self.http3_zero_rtt = r.add(Counter(
            "hapax_http3_early_data_total",
            "Requests that arrived in 0-RTT early data, by outcome (accepted|held|refused).", ("outcome",),
        ))
        self.http3_migrations = r.add(Counter(
            "hapax_http3_migrations_total", "QUIC connections whose client moved to a new address.",
        ))
        self.http3_connections_open = r.add(Gauge(
            "hapax_http3_connections_open", "QUIC connections open right now.",
        ))
        for kind in ("full", "resumed"):
            self.http3_handshakes.zero(kind)
        for outcome in ("accepted", "held", "refused"):
            self.http3_zero_rtt.zero(outcome)
        self.http3_migrations.zero()
        self.http3_connections_open.set(to=0)
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
            merge="max",
        ))
        #: Per-process series (CPU, memory, fds, GC): never added up across workers.
        self.process = ProcessMetrics()
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
        #: The front doors' ``protocol`` label values whose zero series exist; ``h3`` is added
        #: by the node when HTTP/3 is on, so a node without it exports no ``h3`` zeros.
        self.protocols: tuple[str, ...] = ("h1",)

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
        self._zero_requests()
        for model, provider in self._served:
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

    def _zero_requests(self) -> None:
        for model, provider in self._served:
            for route in MODEL_ROUTES:
                for status in ZERO_STATUSES:
                    for protocol in self.protocols:
                        self.requests.zero(route, model, provider, status, protocol)

    def add_protocol(self, protocol: str) -> None:
        """Another front door serves requests: its zero series exist from now on."""
        if protocol not in self.protocols:
            self.protocols = (*self.protocols, protocol)
            self._zero_requests()

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


class _GCPauses:
    """Collector pauses per generation, from one process-wide ``gc.callbacks`` hook.

    Installed once however many registries exist; costs two clock reads per collection.
    (Counts of collections and collected objects come from the library's ``GCCollector``.)
    """

    def __init__(self) -> None:
        self.pauses: list[list[float]] = [[] for _ in range(3)]  # drained into histograms per scrape
        self._t0 = 0.0
        gc.callbacks.append(self._hook)

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        pauses = self.pauses[info["generation"]]
        if len(pauses) < 10_000:  # bounded between scrapes
            pauses.append(time.perf_counter() - self._t0)


_gc_pauses: _GCPauses | None = None


def _gc() -> _GCPauses:
    global _gc_pauses
    if _gc_pauses is None:
        _gc_pauses = _GCPauses()
    return _gc_pauses


#: A snapshot's per-process families: ``[name, help, type, unit, [[sample, labels, value], ...]]``.
FamilyData = list[Any]


_frozen_objects: int | None = None


def freeze_gc() -> None:
    """``gc.freeze()``, remembering the count for ``python_gc_frozen_objects``.

    ``gc.get_freeze_count()`` walks every frozen object (most of a node's heap): measured at
    ~20 ms on a node with 2,000 streams open, a stall of every stream on each scrape. The count
    only changes when something freezes, so it is taken here, once.
    """
    global _frozen_objects
    gc.freeze()
    _frozen_objects = gc.get_freeze_count()


def frozen_objects() -> int:
    """Objects out of the collector's reach (as of the last ``freeze_gc``)."""
    global _frozen_objects
    if _frozen_objects is None:  # a process that never froze through freeze_gc: look once
        _frozen_objects = gc.get_freeze_count()
    return _frozen_objects


class ProcessMetrics:
    """The library's ``process_*``, ``python_gc_*`` and ``python_info`` series, plus two of
    Hapax's own (``python_gc_pause_seconds``, ``python_gc_frozen_objects``); read at scrape time."""

    def __init__(self) -> None:
        # The library's own instances (its default registry's); we only call their collect().
        self._collectors = (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR)
        r = self._own = Registry()
        self.gc_pause = r.add(Histogram(
            "python_gc_pause_seconds", "Time the collector stopped the process, by generation.",
            ("generation",), buckets=GC_BUCKETS,
        ))
        self.gc_frozen = r.add(Gauge(
            "python_gc_frozen_objects", "Objects gc.freeze() moved out of the collector's reach.",
        ))
        self._gc = _gc()
        for g in range(3):
            self.gc_pause.zero(str(g))
        r.on_collect(self._refresh)

    def _refresh(self) -> None:
        self.gc_frozen.set(to=frozen_objects())
        for g, label in enumerate(("0", "1", "2")):
            pauses, self._gc.pauses[g] = self._gc.pauses[g], []
            for p in pauses:
                self.gc_pause.observe(p, label)

    def freeze(self) -> Frozen:
        """Hapax's own two, copied on the event loop (the GC hook appends from it)."""
        return self._own.freeze()

    def families(self, frozen: Frozen) -> Iterator[Metric]:
        """All of them; the library's collectors read /proc and ``gc`` now (any thread)."""
        for c in self._collectors:
            yield from c.collect()
        yield from families(frozen)

    def data(self, frozen: Frozen) -> list[FamilyData]:
        """These families as plain data, for a sibling worker to show with a ``worker`` label."""
        return [[f.name, f.documentation, f.type, f.unit, [[s.name, s.labels, s.value] for s in f.samples]]
                for f in self.families(frozen)]


def _labelled(data: FamilyData, worker: str) -> Metric:
    name, doc, typ, unit, samples = data
    f = Metric(name, doc, typ, unit)
    for sname, labels, value in samples:
        f.add_sample(sname, {**labels, "worker": worker}, value)
    return f


#: What ``Exposition.snapshot`` returns (and a sibling worker sends): plain data only.
Snapshot = dict[str, Any]


class _Families:
    """What the library's encoders take: anything with ``collect()``."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Exposition:
    """``GET /metrics``: this process's metrics, merged with its sibling workers', encoded by
    ``prometheus_client`` in the format the scraper's ``Accept`` header asks for.

    Two steps, so a large registry never holds up the event loop: ``freeze`` copies the
    values (on the loop, cheap), then ``encode`` or ``snapshot`` builds the output from the
    copy (milliseconds per thousand series: the node runs it in a thread).
    """

    def __init__(self, metrics: GatewayMetrics, *, worker: int = 0, workers: int = 1) -> None:
        self.metrics = metrics
        self.worker = worker
        self.workers = workers

    def freeze(self) -> tuple[Frozen, Frozen]:
        return self.metrics.registry.freeze(), self.metrics.process.freeze()

    def snapshot(self, frozen: tuple[Frozen, Frozen]) -> Snapshot:
        """This worker's values, for the sibling that is being scraped."""
        return {
            "worker": self.worker, "pid": os.getpid(),
            "metrics": plain(frozen[0]), "process": self.metrics.process.data(frozen[1]),
        }

    def render(self, accept: str | None, peers: Sequence[Snapshot] = ()) -> tuple[bytes, str]:
        """``encode`` of the values now, in the calling thread."""
        return self.encode(self.freeze(), accept, peers)

    def encode(
        self, frozen: tuple[Frozen, Frozen], accept: str | None, peers: Sequence[Snapshot] = ()
    ) -> tuple[bytes, str]:
        """The exposition body and its content type; ``peers`` are sibling workers' snapshots."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(_Families(self._families(frozen, peers))), content_type

    def _families(self, frozen: tuple[Frozen, Frozen], peers: Sequence[Snapshot]) -> Iterator[Metric]:
        """The families of the node's totals."""
        yield from families(frozen[0], [p["metrics"] for p in peers])
        info = GaugeMetricFamily(
            "hapax_worker_info", "Always 1 per worker process whose metrics this scrape includes.",
            labels=("worker", "pid"),
        )
        info.add_metric((str(self.worker), str(os.getpid())), 1)
        for p in peers:
            info.add_metric((str(p["worker"]), str(p["pid"])), 1)
        yield info
        yield GaugeMetricFamily("hapax_workers", "Worker processes the node runs.", value=self.workers)
        if self.workers == 1 and not peers:
            yield from self.metrics.process.families(frozen[1])
            return
        # One series per worker: a sum of start times or of fd limits means nothing.
        by_name: dict[str, Metric] = {}
        for worker, data in [(str(self.worker), self.metrics.process.data(frozen[1])),
                             *((str(p["worker"]), p["process"]) for p in peers)]:
            for fd in data:
                f = _labelled(fd, worker)
                if f.name in by_name:
                    by_name[f.name].samples.extend(f.samples)
                else:
                    by_name[f.name] = f
        yield from by_name.values()
