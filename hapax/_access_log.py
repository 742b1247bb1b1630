"""Recording a finished request: its metrics, and one access line through the ``AccessSink``."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ._exchange import Exchange
from ._metrics import GatewayMetrics, status_class

access_log = logging.getLogger("hapax.access")


class AccessSink(Protocol):
    """Where each request's access line goes: the core builds the fields, the sink does the I/O.

    ``enabled`` is read per request (false: the fields are not even built); the call must
    not block the event loop. A node buffers lines and writes them off the loop.
    """

    @property
    def enabled(self) -> bool: ...

    def __call__(self, fields: dict[str, Any]) -> None: ...


class LoggingAccessSink:
    """The default sink: one ``logging`` record per request on ``hapax.access``, at info."""

    @property
    def enabled(self) -> bool:
        return access_log.isEnabledFor(logging.INFO)

    def __call__(self, fields: dict[str, Any]) -> None:
        access_log.info("request", extra={"fields": fields})


class AccessLog:
    """The recording step of ``Gateway``."""

    # Set by ``Gateway.__init__``.
    metrics: GatewayMetrics
    access_sink: AccessSink

    def _record(self, ex: Exchange, total: float) -> None:
        m = self.metrics
        model = m.models(ex.model) if ex.model else "none"
        provider = m.providers(ex.provider) if ex.provider else "none"
        status = ex.status
        if ex.error is not None and status == 200:
            status = ex.error.status  # a stream that failed after its headers
        m.requests.inc(ex.route, model, provider, str(status), ex.protocol)
        m.request_duration.observe(total, ex.route, model, status_class(status), ex.protocol)
        if ex.provider:
            m.upstream_duration.observe(ex.upstream_seconds, provider, m.deployments(ex.deployment))
            m.gateway_overhead.observe(max(0.0, total - ex.upstream_seconds), ex.route)
        if ex.ttft is not None:
            m.ttft.observe(ex.ttft, model, provider)
        if ex.usage is not None:
            if ex.usage.prompt_tokens:
                m.tokens.inc(model, provider, "input", by=ex.usage.prompt_tokens)
            if ex.usage.completion_tokens:
                m.tokens.inc(model, provider, "output", by=ex.usage.completion_tokens)
        if ex.error is not None:
            m.errors.inc(ex.route, model, ex.error.type, ex.error.code)
        sink = self.access_sink
        if sink.enabled:
            fields: dict[str, Any] = {
                "request_id": ex.request_id,
                "method": ex.method,
                "path": ex.path,
                "route": ex.route,
                "status": status,
                "latency_ms": round(total * 1000, 3),
                "remote": ex.remote,
                "protocol": ex.protocol,
            }
            if ex.model:
                fields["model"] = ex.model
                fields["provider"] = ex.provider
                fields["deployment"] = ex.deployment
                fields["attempts"] = ex.attempts
                fields["stream"] = ex.stream
                fields["upstream_ms"] = round(ex.upstream_seconds * 1000, 3)
            if ex.ttft is not None:
                fields["ttft_ms"] = round(ex.ttft * 1000, 3)
            if ex.usage is not None:
                fields["prompt_tokens"] = ex.usage.prompt_tokens
                fields["completion_tokens"] = ex.usage.completion_tokens
            if ex.principal != "anonymous":
                fields["principal"] = ex.principal
            if ex.team:
                fields["team"] = ex.team
            if ex.key_name:
                fields["key_name"] = ex.key_name
            if ex.cost_usd is not None:
                fields["cost_usd"] = round(ex.cost_usd, 8)
            if ex.error is not None:
                fields["error_code"] = ex.error.code
            if ex.request_body:
                fields["request_body"] = ex.request_body.decode("utf-8", "replace")
            if ex.response_body:
                fields["response_body"] = ex.response_body.decode("utf-8", "replace")
            sink(fields)
