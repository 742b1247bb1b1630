"""Limits and budgets: reserve what a call may consume, or refuse it (403, 429)."""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from .._errors import PermissionDenied, QuotaExceeded, RateLimited
from .._exchange import Exchange
from .._usage import estimate_prompt_tokens
from ..config import Config, ModelConfig
from ..state import Ask, BudgetScope, FailurePolicy, Grant, Refusal, Scope, day_of, month_of
from ._authenticate import Authentication
from ._pricing import PriceTable
from ._principal import Principal
from ._roles import Permission, allowed

#: A request no limit or budget applies to: nothing to reserve.
_NO_ASK = Ask()


@dataclass(slots=True)
class AccessGrant:
    """What ``admit`` reserved for one call; ``settle`` turns it into what was spent."""

    principal: Principal
    #: Headers for the response (``x-ratelimit-*``).
    headers: dict[str, str] = field(default_factory=dict)
    #: The state reservation over every scope; ``None`` when no limit applies.
    grant: Grant | None = None
    model: ModelConfig | None = None
    #: Tokens reserved: estimated prompt plus the output allowance.
    estimate_tokens: int = 0
    estimate_prompt: int = 0
    stream: bool = False
    day: str = ""
    settled: bool = False
    #: The prices of the config the call was admitted on: it settles at those, whatever reloads.
    prices: PriceTable | None = None


class Limits(Authentication):
    # -- admission ---------------------------------------------------------------------

    async def admit(
        self, principal: Principal, model: ModelConfig, body: dict[str, Any], ex: Exchange,
        *, config: Config | None = None,
    ) -> AccessGrant:
        """Reserve what the call may use by the limits, budgets and prices of ``config``: the
        request's snapshot (the one in force when omitted). Settlement uses the same prices."""
        if not allowed(principal.role, Permission.CALL_MODELS):
            raise PermissionDenied(f"role '{principal.role}' may not call models")
        if principal.models is not None and not (
            model.name in principal.models or any(a in principal.models for a in model.aliases)
        ):
            raise PermissionDenied(
                f"this API key may not use the model '{body.get('model')}'", param="model", code="model_not_allowed"
            )
        cfg = self.config if config is None else config
        # A request that began before a reload but is admitted after it (its body was parsed
        # off the loop meanwhile) is priced by its own config; a table of its own is built then.
        prices = self.prices if cfg is self.config else PriceTable(cfg.pricing)
        ex.team = principal.team or ""
        est_prompt = estimate_prompt_tokens(body)
        est_out = self._output_estimate(body, ex, cfg)
        est_tokens = est_prompt + est_out
        est_usd = prices.reserve_cost(model, prompt=est_prompt, completion=est_out)

        ask = self.ask(principal, est_tokens, est_usd, cfg)
        grant: Grant | None = None
        if ask.any():
            r = await self.state.reserve(ask)
            if isinstance(r, Refusal):
                ex.ratelimit_headers = r.headers or None
                now = self._now()
                self._note_refusal(principal, model, now)
                if r.is_budget:
                    self._budget_refused(r, principal, ex, now)
                self._rate_refused(r)
            grant = r
            if r.headers:
                ex.ratelimit_headers = r.headers
        now = self._now()
        if principal.is_key:
            self.keys.touch(principal.id, now)
        return AccessGrant(
            principal, headers=grant.headers if grant else {}, grant=grant, model=model,
            estimate_tokens=est_tokens, estimate_prompt=est_prompt, stream=bool(body.get("stream")),
            day=grant.day if grant else day_of(now), prices=prices,
        )

    def scopes(
        self, principal: Principal, cfg: Config | None = None
    ) -> tuple[tuple[Scope, ...], tuple[BudgetScope, ...]]:
        """The rate and budget scopes that apply to ``principal`` by ``cfg`` (the config in
        force when omitted): key, team, global."""
        cfg = cfg or self.config
        rate: list[Scope] = []
        budget: list[BudgetScope] = []
        team_cfg = cfg.teams.get(principal.team) if principal.team else None
        if principal.is_key:
            if principal.limits.any():
                rate.append(Scope("key", principal.id, principal.limits))
            if principal.budget.any():
                budget.append(BudgetScope("key", principal.id, principal.budget))
        if team_cfg is not None and principal.team:
            if team_cfg.limits.any():
                rate.append(Scope("team", principal.team, team_cfg.limits))
            if team_cfg.budget.any():
                budget.append(BudgetScope("team", principal.team, team_cfg.budget))
        if cfg.limits.any():
            rate.append(Scope("global", "", cfg.limits))
        return tuple(rate), tuple(budget)

    def ask(self, principal: Principal, tokens: int, usd: float, cfg: Config | None = None) -> Ask:
        cfg = cfg or self.config
        rate, budget = self.scopes(principal, cfg)
        if not rate and not budget:
            return _NO_ASK
        return Ask(rate, budget, tokens, usd, self._policy(principal, rate, budget, cfg))

    def _policy(
        self, principal: Principal, rate: tuple[Scope, ...], budget: tuple[BudgetScope, ...], cfg: Config
    ) -> FailurePolicy:
        """``fail_closed`` if any scope of the request says so, else ``fail_open``.

        A scope's ``limits.on_redis_failure`` overrides ``state.on_redis_failure``; a key's
        or team's budget follows the ``limits`` of the same key or team.
        """
        default = cfg.state.on_redis_failure
        lims = [s.limits for s in rate]
        for b in budget:
            team_cfg = cfg.teams.get(b.id) if b.kind == "team" else None
            lims.append(team_cfg.limits if team_cfg is not None else principal.limits)
        for lim in lims:
            if (lim.on_redis_failure or default) == "fail_closed":
                return "fail_closed"
        return "fail_open"

    def _output_estimate(self, body: dict[str, Any], ex: Exchange, cfg: Config) -> int:
        if ex.route == "embeddings":
            return 0
        for k in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return cfg.limits.output_tokens_estimate

    def _note_refusal(self, principal: Principal, model: ModelConfig, now: float) -> None:
        """A 429 for a limit or budget goes into usage too: an operator sees who hit a wall."""
        self.ledger.refuse(day=day_of(now), key=principal.id, team=principal.team or "", model=model.name)
        self._schedule_flush()

    def _rate_refused(self, d: Refusal) -> NoReturn:
        if d.limit == "state_unavailable":
            if self.metrics is not None:
                self.metrics.limited.inc("state", d.limit)
            raise RateLimited(
                "shared limits cannot be checked: the state store (Redis) is unavailable and this "
                "request's limits are fail_closed (state.on_redis_failure); retry shortly",
                param="state.on_redis_failure", retry_after=d.retry_after, code="state_unavailable",
            )
        assert d.scope is not None
        if self.metrics is not None:
            self.metrics.limited.inc(d.scope.kind, d.limit)
        param = f"{d.scope.kind}.{d.limit}"
        value = int(d.value)
        if d.limit == "concurrent":
            raise RateLimited(
                f"concurrency limit reached: {d.scope.label} allows {value} requests in flight",
                param=param, retry_after=d.retry_after, code="concurrency_limit_exceeded",
            )
        unit = "requests" if d.limit == "requests_per_minute" else "tokens"
        raise RateLimited(
            f"rate limit reached: {d.scope.label} {d.limit} is {value} {unit} per minute; "
            f"retry in {d.retry_after:.2f}s",
            param=param, retry_after=d.retry_after,
        )

    def _budget_refused(self, d: Refusal, principal: Principal, ex: Exchange, now: float) -> NoReturn:
        assert d.scope is not None
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
                details={"limit": d.limit, "cap": d.value, "used": round(d.used, 8), "period": period},
            )
        unit = "USD" if d.limit.endswith("usd") else "tokens"
        raise QuotaExceeded(
            f"{d.scope.label} {d.limit} budget of {d.value:g} {unit} is used up for {period} "
            f"({d.used:g} used or reserved)",
            param=f"{d.scope.kind}.{d.limit}", retry_after=d.retry_after,
        )
