"""Config for the reliability layer: retries, circuit breakers, admission, dedup, probes.

These models hang off ``hapax.config``: ``Config.reliability`` holds the
gateway-wide defaults, ``ModelConfig`` adds ``strategy``, ``max_concurrency``
and an optional ``retry`` override, ``Deployment`` adds ``max_concurrency``,
``ProviderConfig`` adds ``health_check``. They live here so the reliability
layer's knobs and their reasons sit in one place.

Units: seconds unless the name says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Three tries cover "one bad connection, then one other deployment" without
#: tripling the load an outage sends upstream.
DEFAULT_MAX_ATTEMPTS = 3
#: First backoff step; doubles per retry of the same deployment, with full jitter.
DEFAULT_BACKOFF_BASE = 0.1
DEFAULT_BACKOFF_MAX = 2.0
#: Providers sometimes ask for minutes; waiting that long inside a request is worse
#: than answering 429 and letting the client decide.
DEFAULT_RETRY_AFTER_CAP = 10.0
#: Until the answer starts: every attempt and backoff together. Streams may then run
#: on under the provider's own ``timeouts.total``.
DEFAULT_RETRY_DEADLINE = 120.0

#: Envoy's outlier detection also defaults to 5 consecutive errors.
DEFAULT_CONSECUTIVE_FAILURES = 5
DEFAULT_OPEN_FOR = 30.0
#: A cool-down beyond this is a provider asking too much; the breaker re-checks then.
DEFAULT_MAX_COOLDOWN = 300.0

#: A queue deep enough to ride out a burst, bounded so memory is too.
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_QUEUE_TIMEOUT = 30.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(_Model):
    """Retries and failover of one request, before its answer starts."""

    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=20, description="attempts in all, first included")
    backoff_base: float = Field(DEFAULT_BACKOFF_BASE, ge=0, description="first backoff ceiling, seconds")
    backoff_max: float = Field(DEFAULT_BACKOFF_MAX, ge=0, description="largest backoff ceiling, seconds")
    retry_after_cap: float = Field(
        DEFAULT_RETRY_AFTER_CAP, ge=0, description="longest upstream Retry-After the gateway waits out, seconds"
    )
    deadline: float = Field(
        DEFAULT_RETRY_DEADLINE, gt=0, description="all attempts and waits until the answer starts, seconds"
    )


class BreakerConfig(_Model):
    """A circuit breaker per deployment (provider + upstream model)."""

    enabled: bool = True
    consecutive_failures: int = Field(
        DEFAULT_CONSECUTIVE_FAILURES, ge=1, description="open after this many failures in a row"
    )
    failure_rate: float = Field(0.5, gt=0, le=1, description="open when this share of calls in the window failed")
    window: float = Field(30.0, gt=0, description="failure-rate window, seconds")
    min_requests: int = Field(20, ge=1, description="calls in the window before the rate counts")
    open_for: float = Field(DEFAULT_OPEN_FOR, gt=0, description="how long an open breaker rejects, seconds")
    half_open_trials: int = Field(1, ge=1, description="trial calls let through at once when half-open")
    close_after: int = Field(1, ge=1, description="successful trials that close the breaker")
    max_cooldown: float = Field(
        DEFAULT_MAX_COOLDOWN, ge=0, description="cap on a 429's Retry-After cool-down, seconds"
    )


class AdmissionConfig(_Model):
    """Gateway-wide concurrency and the priority queue in front of it."""

    max_concurrency: int | None = Field(None, ge=1, description="calls in flight on this node; none: unlimited")
    queue_size: int = Field(DEFAULT_QUEUE_SIZE, ge=0, description="requests that may wait; 0: reject at once")
    queue_timeout: float = Field(DEFAULT_QUEUE_TIMEOUT, gt=0, description="longest wait in the queue, seconds")
    #: 503 says "the gateway is overloaded"; some clients only back off on 429.
    reject_status: Literal[429, 503] = 503


class DedupConfig(_Model):
    """Merging identical concurrent non-streaming requests into one upstream call."""

    enabled: bool = True


class ReliabilityConfig(_Model):
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


class HealthCheckConfig(_Model):
    """Active probes of one provider."""

    #: Off by default: a probe is traffic the operator did not ask for.
    enabled: bool = False
    #: ``cheap``: a GET that costs no tokens (list models). ``prompt``: a one-token
    #: completion on ``model``, for upstreams whose cheap endpoint proves too little.
    mode: Literal["cheap", "prompt"] = "cheap"
    model: str | None = Field(None, description="upstream model for mode: prompt")
    interval: float = Field(10.0, gt=0, description="seconds between probes")
    timeout: float = Field(2.0, gt=0, description="one probe, seconds")
    healthy_threshold: int = Field(2, ge=1, description="successes in a row to mark healthy")
    unhealthy_threshold: int = Field(3, ge=1, description="failures in a row to mark unhealthy")

    @model_validator(mode="after")
    def _check(self) -> HealthCheckConfig:
        if self.mode == "prompt" and not self.model:
            raise ValueError("health_check.mode 'prompt' needs health_check.model")
        return self


def check_strategy(name: str) -> str:
    from ..routing import STRATEGIES

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return name
