"""Config for who may call and how much: auth, limits, teams, prices, audit.

These models hang off the top-level ``Config`` (``auth``, ``limits``,
``teams``, ``pricing``, ``audit``). They live here, not in ``_config``, so the
access layer's settings change in one place. Units: per minute for rates,
US dollars for money, tokens for quotas, seconds unless named otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

#: Reserved for the output of a call that gives no ``max_tokens``: a typical
#: chat answer. Callers who want exact budgets set ``max_tokens``.
DEFAULT_OUTPUT_TOKENS_ESTIMATE = 256
#: Events a node holds for a slow audit directory (~4 MB); a stuck disk costs that much memory, no more.
DEFAULT_AUDIT_QUEUE_SIZE = 10_000
#: 10 MiB per audit file keeps each one quick to verify and to ship.
DEFAULT_AUDIT_MAX_BYTES = 10 * 1024 * 1024
#: A quarter and a bit: long enough for a quarterly access review.
DEFAULT_AUDIT_RETENTION_DAYS = 100
#: Usage rows older than this are dropped: a year and a month, for year-on-year bills.
DEFAULT_USAGE_RETENTION_DAYS = 400
#: Seconds between writes of the usage ledger file: each is an fsync.
DEFAULT_USAGE_FLUSH_FILE = 5.0
#: Seconds between flushes of usage deltas to Redis: how far another node's report lags.
DEFAULT_USAGE_FLUSH_SHARED = 1.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimits(_Model):
    """Rate limits of one scope (a key, a team, or the whole gateway). Unset is unlimited."""

    requests_per_minute: int | None = Field(None, ge=1, description="sustained request rate")
    request_burst: int | None = Field(
        None, ge=1, description="requests allowed at once from idle; defaults to requests_per_minute"
    )
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")
    concurrent: int | None = Field(None, ge=1, description="requests in flight at once")
    on_redis_failure: Literal["fail_open", "fail_closed"] | None = Field(
        None, description="this scope's policy when Redis is unreachable; defaults to state.on_redis_failure"
    )

    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.concurrent))


class Budget(_Model):
    """Quotas and spend caps of one scope, per UTC calendar day and month. Unset is unlimited."""

    daily_tokens: int | None = Field(None, ge=0)
    monthly_tokens: int | None = Field(None, ge=0)
    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)

    def any(self) -> bool:
        return any(
            v is not None for v in (self.daily_tokens, self.monthly_tokens, self.daily_usd, self.monthly_usd)
        )


class TeamConfig(_Model):
    limits: RateLimits = Field(default_factory=RateLimits)
    budget: Budget = Field(default_factory=Budget)


class GlobalLimits(RateLimits):
    """Limits on the gateway as a whole, plus how output is estimated before a call."""

    output_tokens_estimate: int = Field(
        DEFAULT_OUTPUT_TOKENS_ESTIMATE,
        ge=0,
        description="tokens reserved for the answer when a request gives no max_tokens",
    )


class AuthConfig(_Model):
    mode: Literal["none", "keys"] = Field(
        "none", description="none: anyone may call models (demo); keys: an API key is required"
    )
    admin_key: SecretStr | None = Field(
        None, description="bootstrap admin credential, e.g. ${HAPAX_ADMIN_KEY}; at least 32 characters"
    )
    state_dir: str | None = Field(
        None, description="directory for keys, usage and the audit log; memory only when unset"
    )
    admin_cors_origins: tuple[str, ...] = Field(
        (), description="origins allowed to call /admin from a browser; none by default"
    )

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < 32:
            raise ValueError("admin_key must be at least 32 characters (use: hapax keys generate)")
        return self


class ModelPrice(_Model):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0, description="defaults to input")


class AuditConfig(_Model):
    enabled: bool = True
    path: str | None = Field(None, description="directory for audit files; <state_dir>/audit by default")
    max_bytes: int = Field(DEFAULT_AUDIT_MAX_BYTES, ge=4096, description="rotate the file past this size")
    retention_days: int = Field(DEFAULT_AUDIT_RETENTION_DAYS, ge=1, description="delete rotated files older")
    fsync: bool = Field(False, description="fsync after every event (slower, survives power loss)")
    queue_size: int = Field(
        DEFAULT_AUDIT_QUEUE_SIZE, ge=1,
        description="events waiting for the audit directory before new ones are dropped (and counted)",
    )


class UsageConfig(_Model):
    retention_days: int = Field(DEFAULT_USAGE_RETENTION_DAYS, ge=1)
    #: ``None``: 5 s for the ledger file (each write is an fsync), 1 s for Redis (one pipeline,
    #: and what ``/admin/usage`` on another node lags by).
    flush_interval: float | None = Field(None, gt=0, description="seconds between writes of the usage ledger")

    def flush_seconds(self, *, shared: bool) -> float:
        if self.flush_interval is not None:
            return self.flush_interval
        return DEFAULT_USAGE_FLUSH_SHARED if shared else DEFAULT_USAGE_FLUSH_FILE
