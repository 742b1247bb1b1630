"""Limits and budgets: reserve what a call may consume, or refuse it (403, 429)."""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from .._budget import BudgetDenied, BudgetGrant, BudgetScope, day_of, month_of
from .._errors import PermissionDenied, QuotaExceeded, RateLimited
from .._exchange import Exchange
from .._ratelimit import RateDenied, RateGrant, Scope
from .._usage import estimate_prompt_tokens
from ..config import ModelConfig
from ._authenticate import Authentication
from ._principal import Principal
from ._roles import Permission, allowed


@dataclass(slots=True)
class AccessGrant:
    """What ``admit`` reserved for one call; ``settle`` turns it into what was spent."""

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



class Limits(Authentication):
    # -- admission ---------------------------------------------------------------------

    async def admit(
        self, principal: Principal, model: ModelConfig, body: dict[str, Any], ex: Exchange
    ) -> AccessGrant:
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
        return AccessGrant(
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
