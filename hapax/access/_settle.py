"""Settlement: charge a finished call its real usage, exactly once."""


from __future__ import annotations

from collections.abc import Awaitable

from .._exchange import Exchange
from .._usage import Usage
from ..state import DONE
from ._grant import AccessGrant, Limits
from ._pricing import cost_usd


class Settlement(Limits):
    # -- settlement --------------------------------------------------------------------

    def settle(self, admission: AccessGrant, usage: Usage | None, ex: Exchange) -> Awaitable[None]:
        """Charge the call and end its reservation; once per admission, however the call ended.

        Everything is done (and the state backend's settle committed) before this returns;
        the awaitable only reports that the shared state has it, so a caller cancelled
        while awaiting it loses nothing.
        """
        model = admission.model
        if model is None or admission.settled:
            return DONE
        admission.settled = True
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
        prices = admission.prices or self.prices
        if ex.upstream_model:
            # Priced by the deployment that answered: one public model may be self-hosted and Claude.
            price = prices.find(model.name, provider=ex.provider, upstream=ex.upstream_model)
            cost = cost_usd(price, prompt=prompt, completion=completion, cached=cached)
        else:  # no deployment answered; charge as reserved (nothing, unless output went out)
            cost = prices.reserve_cost(model, prompt=prompt, completion=completion)
        ex.cost_usd = cost
        settled = DONE
        if admission.grant is not None:
            settled = self.state.settle(admission.grant, tokens=tokens, usd=cost)
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
        return settled
