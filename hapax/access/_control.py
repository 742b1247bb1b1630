"""Who is calling, and may they: authentication, limits, quotas, budgets, usage.

Theory of operation: the gateway asks ``AccessControl`` three things per
model call. ``authenticate`` turns the request's credential into a
``Principal`` (or refuses, 401). ``admit`` checks the principal's role and
model allowlist (403), then reserves what the call may consume: budgets
first (``hapax._budget``), then rate limits (``hapax._ratelimit``); if the
second refuses, the first is released. Both are synchronous with no ``await``
between check and reserve, so admission is atomic on the event loop.
``admit`` returns an ``Admission`` whose headers (``x-ratelimit-*``) go on
the response; it also leaves them on the ``Exchange``, refusals included, so
a 429 or a later error carries them as a success does (not on the exception:
deduplicated callers share one). ``settle`` is called exactly once when the
call ends, however it ends, with the real usage: it prices the call, corrects
the token buckets, moves the budget reservation to spent, and adds a usage row.

Auth modes: ``none`` (everyone is the anonymous principal; only global
limits apply; the admin API still needs the bootstrap admin key) and
``keys`` (every call needs an API key from the key store, or the bootstrap
admin key from config). State lives under ``auth.state_dir`` (keys, usage,
audit) or in memory when it is unset.

What is charged: the provider's reported usage; when a stream ended before
usage arrived but after output began, the larger of the estimate and what was
counted (a client cannot dodge its budget by hanging up); nothing when the
call failed before any output.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .._budget import BudgetDenied, BudgetGrant, BudgetLedger, BudgetScope, day_of, month_of
from .._errors import AuthenticationFailed, PermissionDenied, QuotaExceeded, RateLimited
from .._exchange import Exchange
from .._files import private_dir
from .._http import Request, Response
from .._ratelimit import RateDenied, RateGrant, RateLimiter, Scope
from .._usage import Usage, estimate_prompt_tokens
from ..config import Budget, Config, ModelConfig, RateLimits, default_config
from ._audit import Audit, FileAudit
from ._keys import FileKeyStore, KeyRecord, KeyStore, MemoryKeyStore, hash_secret
from ._pricing import PriceTable, cost_usd
from ._roles import Permission, allowed
from ._usage_ledger import UsageFile, UsageLedger

if TYPE_CHECKING:
    from .._metrics import GatewayMetrics

log = logging.getLogger("hapax.access")


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: str = "developer"
    team: str | None = None
    #: Highest priority this caller may ask for with ``x-hapax-priority`` (0 is highest).
    max_priority: int = 0
    default_priority: int = 5
    name: str = ""
    #: Public model names this caller may use; ``None`` is every model.
    models: frozenset[str] | None = None
    limits: RateLimits = field(default_factory=RateLimits)
    budget: Budget = field(default_factory=Budget)
    #: True for a key from the key store (it has its own limits and usage row).
    is_key: bool = False


ANONYMOUS = Principal(id="anonymous", name="anonymous (auth mode none)")
BOOTSTRAP_ADMIN = Principal(id="bootstrap-admin", role="admin", name="bootstrap admin key")


def principal_of(rec: KeyRecord) -> Principal:
    return Principal(
        id=rec.id, role=rec.role, team=rec.team, max_priority=rec.max_priority,
        default_priority=rec.default_priority, name=rec.name,
        models=frozenset(rec.models) if rec.models is not None else None,
        limits=rec.limits, budget=rec.budget, is_key=True,
    )


@dataclass(slots=True)
class Admission:
    principal: Principal
    #: Headers for the response (``x-ratelimit-*``).
    headers: dict[str, str] = field(default_factory=dict)
    rate: RateGrant | None = None
    budget: BudgetGrant | None = None
    model: ModelConfig | None = None
    #: Tokens reserved: estimated prompt plus the output allowance.
    estimate_tokens: int = 0
    estimate_prompt: int = 0
    stream: bool = False
    day: str = ""


def credential(headers: Mapping[str, str]) -> str | None:
    """The caller's API key: ``Authorization: Bearer`` (OpenAI SDKs) or ``x-api-key`` (Anthropic's)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    if key and key.strip():
        return key.strip()
    return None


class AccessControl:
    def __init__(
        self,
        config: Config | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        announce: bool = True,
    ) -> None:
        cfg = config or default_config()
        self.config = cfg
        self._now = wall_clock
        self._mono = monotonic
        state = state_dir if state_dir is not None else cfg.auth.state_dir
        self.state_dir = Path(state) if state else None
        self.keys: KeyStore
        self.audit: Audit
        self._usage_file: UsageFile | None = None
        #: Permission bits of the state directory as found (``None``: no state directory).
        self.state_dir_mode = private_dir(self.state_dir) if self.state_dir is not None else None
        if self.state_dir is not None:
            self.keys = FileKeyStore(self.state_dir / "keys")
            self._usage_file = UsageFile(self.state_dir / "usage.json")
        else:
            self.keys = MemoryKeyStore()
        self.audit = self._make_audit(cfg)
        self.ledger = UsageLedger()
        self.budgets = BudgetLedger()
        self.limiter = RateLimiter()
        if self._usage_file is not None:
            self._usage_file.load(self.ledger)
            self._rebuild_budgets()
        self.prices = PriceTable(cfg.pricing)
        self.metrics: GatewayMetrics | None = None
        self._admin_digest: str | None = None
        self._exhausted: set[tuple[str, str, str, str]] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self.started_at = self._now()
        self.node_id = f"{socket.gethostname()}:{os.getpid()}"
        #: Reject allowlists naming models the config lacks (off for the CLI without --config).
        self.check_models = True
        self._configure(cfg)
        if announce:
            self._announce()

    # -- lifecycle ---------------------------------------------------------------------

    def _make_audit(self, cfg: Config) -> Audit:
        if not cfg.audit.enabled:
            return Audit(keep=0)
        path = cfg.audit.path or (str(self.state_dir / "audit") if self.state_dir else None)
        if path is None:
            return Audit()
        return FileAudit(
            path, max_bytes=cfg.audit.max_bytes, retention_days=cfg.audit.retention_days, fsync=cfg.audit.fsync
        )

    def _configure(self, cfg: Config) -> None:
        self.config = cfg
        self.prices = PriceTable(cfg.pricing)
        key = cfg.auth.admin_key
        self._admin_digest = hash_secret(key.get_secret_value()) if key is not None else None
        self._bind_teams()

    def _announce(self) -> None:
        cfg = self.config
        if cfg.auth.mode == "none":
            log.warning(
                "AUTH IS OFF (auth.mode: none): anyone who can reach this port can call every model. "
                "Set auth.mode: keys before exposing it.",
            )
        elif self.state_dir is None:
            log.warning("auth.state_dir is unset: API keys, usage and audit live in memory and die with the process")
        if self.state_dir_mode is not None and self.state_dir_mode & 0o077:
            log.warning(
                "auth.state_dir %s is open to group or others (mode %o); "
                "it holds key hashes, usage and the audit log: chmod 700 it",
                self.state_dir, self.state_dir_mode,
            )
        self.audit.record(
            "gateway.started", actor="system",
            details={"auth_mode": cfg.auth.mode, "node": self.node_id,
                     "state_dir": str(self.state_dir) if self.state_dir else None},
        )

    def attach(self, metrics: GatewayMetrics) -> None:
        """Count into the gateway's metrics registry."""
        self.metrics = metrics
        self._bind_teams()

    def _bind_teams(self) -> None:
        if self.metrics is not None:
            teams = set(self.config.teams) | {r.team for r in self.keys.all() if r.team}
            self.metrics.bind_teams(teams)

    def apply(self, config: Config, *, actor: str = "config-file") -> None:
        """A new config is in force: reprice, re-limit, and record what changed."""
        old = self.config
        changed = sorted(
            name for name in type(config).model_fields if getattr(old, name) != getattr(config, name)
        )
        self._configure(config)
        if changed:
            self.audit.record("config.applied", actor=actor, details={"changed_sections": changed})
        if old.auth.mode != config.auth.mode:
            self.audit.record("config.auth_mode_changed", actor=actor,
                              details={"from": old.auth.mode, "to": config.auth.mode})
            if config.auth.mode == "none":
                self._announce()

    def flush(self) -> None:
        """Write usage and last-used times; safe to call any time."""
        self._flush_handle = None
        now = self._now()
        self.ledger.prune(now=now, retention_days=self.config.usage.retention_days)
        self.budgets.prune(now=now)
        if self._usage_file is not None and self.ledger.dirty:
            self._usage_file.save(self.ledger)
        self.keys.flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None or self._usage_file is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_handle = loop.call_later(self.config.usage.flush_interval, self.flush)

    async def aclose(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
        self.audit.close()

    def _rebuild_budgets(self) -> None:
        now = self._now()
        today, month = day_of(now), month_of(now)
        for row in self.ledger.query(since=month + "-01"):
            tokens, usd = row["total_tokens"], row["cost_usd"]
            for kind, id in (("key", row["key"]), ("team", row["team"])):
                if not id:
                    continue
                self.budgets.add_spent(kind, id, month, tokens, usd)
                if row["day"] == today:
                    self.budgets.add_spent(kind, id, today, tokens, usd)

    # -- authentication ----------------------------------------------------------------

    async def authenticate(self, req: Request, ex: Exchange) -> Principal:
        if self.config.auth.mode == "none":
            return ANONYMOUS
        return self.identify(req, ex)

    def identify(self, req: Request, ex: Exchange) -> Principal:
        """The principal behind the request's credential, in any auth mode; 401 if none."""
        secret = credential(req.headers)
        if secret is None:
            self._auth_failed(ex, "missing")
            raise AuthenticationFailed(
                "no API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'", code="missing_api_key"
            )
        digest = hash_secret(secret)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return BOOTSTRAP_ADMIN
        rec = self.keys.by_hash(digest)
        if rec is None:
            self._auth_failed(ex, "unknown")
            raise AuthenticationFailed("invalid API key")
        if rec.revoked:
            self._auth_failed(ex, "revoked", rec.id)
            raise AuthenticationFailed("this API key has been revoked")
        if rec.expired(self._now()):
            self._auth_failed(ex, "expired", rec.id)
            raise AuthenticationFailed("this API key has expired")
        return principal_of(rec)

    def _auth_failed(self, ex: Exchange, reason: str, key_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.auth_failures.inc(reason)
        # Never the credential itself, nor a hash of it: a low-entropy guess could be reversed.
        self.audit.record(
            "auth.failed", actor=key_id or "unknown", remote=ex.remote, request_id=ex.request_id,
            details={"reason": reason, "path": ex.path},
        )

    # -- authorization -----------------------------------------------------------------

    def authorize(self, req: Request, ex: Exchange, permission: Permission) -> Principal:
        """Gate an operator view outside ``/admin`` (``GET /v1/health/providers``) by role.

        With ``auth.mode: none`` it stays open like the rest of the demo; with keys,
        no credential is 401 and a role without ``permission`` is 403.
        """
        if self.config.auth.mode == "none":
            return ANONYMOUS
        who = self.identify(req, ex)
        ex.principal = who.id
        self.require(who, permission, ex, method=req.method, path=req.path)
        return who

    def require(self, who: Principal, permission: Permission, ex: Exchange, *, method: str, path: str) -> None:
        """403 (and an ``admin.denied`` audit event) unless ``who``'s role holds ``permission``."""
        if allowed(who.role, permission):
            return
        self.audit.record(
            "admin.denied", actor=who.id, remote=ex.remote, request_id=ex.request_id, target=None,
            details={"method": method, "path": path, "needs": permission.value},
        )
        raise PermissionDenied(f"role '{who.role}' lacks the '{permission.value}' permission")

    # -- admission ---------------------------------------------------------------------

    async def admit(
        self, principal: Principal, model: ModelConfig, body: dict[str, Any], ex: Exchange
    ) -> Admission:
        if not allowed(principal.role, Permission.CALL_MODELS):
            raise PermissionDenied(f"role '{principal.role}' may not call models")
        if principal.models is not None and not (
            model.name in principal.models or any(a in principal.models for a in model.aliases)
        ):
            raise PermissionDenied(
                f"this API key may not use the model '{body.get('model')}'", param="model", code="model_not_allowed"
            )
        cfg = self.config
        ex.team = principal.team or ""
        est_prompt = estimate_prompt_tokens(body)
        est_out = self._output_estimate(body, ex)
        est_tokens = est_prompt + est_out
        est_usd = self.prices.reserve_cost(model, prompt=est_prompt, completion=est_out)

        rate_scopes: list[Scope] = []
        budget_scopes: list[BudgetScope] = []
        team_cfg = cfg.teams.get(principal.team) if principal.team else None
        if principal.is_key:
            if principal.limits.any():
                rate_scopes.append(Scope("key", principal.id, principal.limits))
            if principal.budget.any():
                budget_scopes.append(BudgetScope("key", principal.id, principal.budget))
        if team_cfg is not None and principal.team:
            if team_cfg.limits.any():
                rate_scopes.append(Scope("team", principal.team, team_cfg.limits))
            if team_cfg.budget.any():
                budget_scopes.append(BudgetScope("team", principal.team, team_cfg.budget))
        if cfg.limits.any():
            rate_scopes.append(Scope("global", "", cfg.limits))

        now = self._now()
        # From here to the return there is no await: check and reserve are one step.
        bgrant: BudgetGrant | None = None
        if budget_scopes:
            b = self.budgets.reserve(tuple(budget_scopes), est_tokens, est_usd, now=now)
            if isinstance(b, BudgetDenied):
                if rate_scopes:
                    # Refused before the rate limits were asked: report them as they stand.
                    ex.ratelimit_headers = self.limiter.headers(tuple(rate_scopes), now=self._mono())
                self._note_refusal(principal, model, now)
                self._budget_refused(b, principal, ex, now)
            bgrant = b
        rgrant: RateGrant | None = None
        if rate_scopes:
            r = self.limiter.reserve(tuple(rate_scopes), est_tokens, now=self._mono())
            if isinstance(r, RateDenied):
                if bgrant is not None:
                    self.budgets.release(bgrant)
                ex.ratelimit_headers = r.headers
                self._note_refusal(principal, model, now)
                self._rate_refused(r)
            rgrant = r
            ex.ratelimit_headers = r.headers
        if principal.is_key:
            self.keys.touch(principal.id, now)
        return Admission(
            principal, headers=rgrant.headers if rgrant else {}, rate=rgrant, budget=bgrant, model=model,
            estimate_tokens=est_tokens, estimate_prompt=est_prompt, stream=bool(body.get("stream")),
            day=day_of(now),
        )

    def _output_estimate(self, body: dict[str, Any], ex: Exchange) -> int:
        if ex.route == "embeddings":
            return 0
        for k in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return self.config.limits.output_tokens_estimate

    def _note_refusal(self, principal: Principal, model: ModelConfig, now: float) -> None:
        """A 429 for a limit or budget goes into usage too: an operator sees who hit a wall."""
        self.ledger.refuse(day=day_of(now), key=principal.id, team=principal.team or "", model=model.name)
        self._schedule_flush()

    def _rate_refused(self, d: RateDenied) -> NoReturn:
        if self.metrics is not None:
            self.metrics.limited.inc(d.scope.kind, d.limit)
        param = f"{d.scope.kind}.{d.limit}"
        if d.limit == "concurrent":
            raise RateLimited(
                f"concurrency limit reached: {d.scope.label} allows {d.limit_value} requests in flight",
                param=param, retry_after=d.retry_after, code="concurrency_limit_exceeded",
            )
        unit = "requests" if d.limit == "requests_per_minute" else "tokens"
        raise RateLimited(
            f"rate limit reached: {d.scope.label} {d.limit} is {d.limit_value} {unit} per minute; "
            f"retry in {d.retry_after:.2f}s",
            param=param, retry_after=d.retry_after,
        )

    def _budget_refused(self, d: BudgetDenied, principal: Principal, ex: Exchange, now: float) -> NoReturn:
        if self.metrics is not None:
            self.metrics.limited.inc(d.scope.kind, d.limit)
        period = day_of(now) if d.limit.startswith("daily") else month_of(now)
        mark = (d.scope.kind, d.scope.id, d.limit, period)
        if mark not in self._exhausted:
            # Once per cap and period: the first refusal is the news, the rest are noise.
            self._exhausted.add(mark)
            self.audit.record(
                "budget.exhausted", actor=principal.id, remote=ex.remote, request_id=ex.request_id,
                target=f"{d.scope.kind}:{d.scope.id}",
                details={"limit": d.limit, "cap": d.cap, "used": round(d.used, 8), "period": period},
            )
        unit = "USD" if d.limit.endswith("usd") else "tokens"
        raise QuotaExceeded(
            f"{d.scope.label} {d.limit} budget of {d.cap:g} {unit} is used up for {period} "
            f"({d.used:g} used or reserved)",
            param=f"{d.scope.kind}.{d.limit}", retry_after=d.retry_after,
        )

    # -- settlement --------------------------------------------------------------------

    def settle(self, admission: Admission, usage: Usage | None, ex: Exchange) -> None:
        model = admission.model
        if model is None:
            return
        prompt = completion = cached = 0
        if usage is not None and usage.reported:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        elif ex.ttft is not None or (usage is not None and not admission.stream):
            # Output went out but the provider never reported usage (a cut stream, a terse
            # upstream): charge at least the reservation, so hanging up early dodges nothing.
            prompt = max(admission.estimate_prompt, usage.prompt_tokens if usage else 0)
            completion = max(
                admission.estimate_tokens - admission.estimate_prompt, usage.completion_tokens if usage else 0
            )
        tokens = prompt + completion
        if ex.upstream_model:
            # Priced by the deployment that answered: one public model may be self-hosted and Claude.
            price = self.prices.find(model.name, provider=ex.provider, upstream=ex.upstream_model)
            cost = cost_usd(price, prompt=prompt, completion=completion, cached=cached)
        else:  # no deployment answered; charge as reserved (nothing, unless output went out)
            cost = self.prices.reserve_cost(model, prompt=prompt, completion=completion)
        ex.cost_usd = cost
        if admission.rate is not None:
            self.limiter.settle(admission.rate, tokens, now=self._mono())
        if admission.budget is not None:
            self.budgets.settle(admission.budget, tokens, cost)
        p = admission.principal
        team = p.team or ""
        failed = ex.error is not None or (ex.status >= 400)
        self.ledger.record(
            day=admission.day, key=p.id, team=team, model=model.name, deployment=ex.deployment,
            prompt=prompt, completion=completion, cached=cached, cost=cost, error=failed,
        )
        m = self.metrics
        if m is not None:
            tl, ml = m.teams(team), m.models(model.name)
            m.team_requests.inc(tl, ml)
            if prompt:
                m.team_tokens.inc(tl, ml, "input", by=prompt)
            if completion:
                m.team_tokens.inc(tl, ml, "output", by=completion)
            if cost:
                m.cost.inc(tl, ml, by=cost)
        self._schedule_flush()

    # -- admin API ---------------------------------------------------------------------

    async def handle_admin(self, req: Request, ex: Exchange) -> Response | None:
        """Answer ``/admin/...`` routes; ``None`` when the path is not one."""
        from ._admin import handle

        return handle(self, req, ex)

    def me(self, req: Request, ex: Exchange) -> Response:
        """``GET /v1/me``: the caller's own key, limits, budget and usage (``hapax._admin.me``)."""
        from ._admin import me

        if self.config.auth.mode == "none" and credential(req.headers) is None:
            who = ANONYMOUS
        else:
            who = self.identify(req, ex)
        ex.principal = who.id
        return me(self, who)

    def key_changed(self) -> None:
        self._bind_teams()
