"""What a call costs: a price table per model and the arithmetic.

Theory of operation: a price is US dollars per million tokens for input,
output and cached input (input served from the provider's prompt cache).

A call is priced by the deployment that answered it, not by the public name:
one public model may be served by a self-hosted deployment and by Claude, at
very different prices. ``PriceTable.find`` looks up, first match wins:

1. ``provider/model`` (the deployment's key) in the config's ``pricing``;
2. the upstream model name in ``pricing``, then in the shipped ``DEFAULT_PRICES``;
3. the public name in ``pricing``, then in ``DEFAULT_PRICES`` (the fallback).

A dated upstream name (``gpt-4o-mini-2024-07-18``) matches the longest table
entry it starts with. A deployment with no price costs 0 and is logged once,
so budgets in USD never silently block it, but are not enforced on it either.

Before the call the answering deployment is not known yet, so the budget
reservation uses ``PriceTable.reserve_cost``: the most expensive of the
model's deployments for that call, an upper bound whichever one answers.

    cost = (prompt - cached) * input + cached * cached_input + completion * output
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import ModelPrice

if TYPE_CHECKING:
    from ..config import ModelConfig

log = logging.getLogger("hapax.access")

#: When the list prices below were taken from the providers' pricing pages.
#: They change; override them in config (``pricing:``) for your contract.
PRICES_AS_OF = "2025-08-15"

#: model: (input, output, cached input), USD per million tokens; standard tier,
#: the lowest context tier where prices are tiered.
DEFAULT_PRICES: dict[str, tuple[float, float, float]] = {
    # OpenAI
    "gpt-5": (1.25, 10.00, 0.125),
    "gpt-5-mini": (0.25, 2.00, 0.025),
    "gpt-5-nano": (0.05, 0.40, 0.005),
    "gpt-4.1": (2.00, 8.00, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-4o": (2.50, 10.00, 1.25),
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4-turbo": (10.00, 30.00, 10.00),
    "gpt-3.5-turbo": (0.50, 1.50, 0.50),
    "gpt-3.5-turbo-instruct": (1.50, 2.00, 1.50),
    "o1": (15.00, 60.00, 7.50),
    "o1-mini": (1.10, 4.40, 0.55),
    "o3": (2.00, 8.00, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
    "text-embedding-3-small": (0.02, 0.0, 0.02),
    "text-embedding-3-large": (0.13, 0.0, 0.13),
    "text-embedding-ada-002": (0.10, 0.0, 0.10),
    # Anthropic (cached = cache read)
    "claude-opus-4-1": (15.00, 75.00, 1.50),
    "claude-opus-4": (15.00, 75.00, 1.50),
    "claude-sonnet-4": (3.00, 15.00, 0.30),
    "claude-3-7-sonnet": (3.00, 15.00, 0.30),
    "claude-3-5-sonnet": (3.00, 15.00, 0.30),
    "claude-3-5-haiku": (0.80, 4.00, 0.08),
    "claude-3-opus": (15.00, 75.00, 1.50),
    "claude-3-haiku": (0.25, 1.25, 0.03),
    # Google Gemini (prompts up to 200k tokens)
    "gemini-2.5-pro": (1.25, 10.00, 0.31),
    "gemini-2.5-flash": (0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite": (0.10, 0.40, 0.025),
    "gemini-2.0-flash": (0.10, 0.40, 0.025),
    "gemini-2.0-flash-lite": (0.075, 0.30, 0.075),
    "gemini-1.5-pro": (1.25, 5.00, 0.3125),
    "gemini-1.5-flash": (0.075, 0.30, 0.01875),
}

ZERO = ModelPrice(input=0.0, output=0.0, cached_input=0.0)


def cost_usd(price: ModelPrice, *, prompt: int, completion: int, cached: int = 0) -> float:
    cached = min(max(cached, 0), prompt)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    return ((prompt - cached) * price.input + cached * cached_rate + completion * price.output) / 1_000_000


def _lookup(table: Mapping[str, ModelPrice], name: str) -> ModelPrice | None:
    p = table.get(name)
    if p is not None:
        return p
    best = ""
    for k in table:
        if name.startswith(k + "-") and len(k) > len(best):
            best = k
    return table[best] if best else None


_DEFAULTS = {k: ModelPrice(input=i, output=o, cached_input=c) for k, (i, o, c) in DEFAULT_PRICES.items()}


class PriceTable:
    """The prices of one config; rebuilt when the config changes, so its caches need no invalidation."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._cache: dict[tuple[str, str, str], ModelPrice] = {}
        self._by_model: dict[str, tuple[ModelConfig, tuple[ModelPrice, ...]]] = {}
        self._warned: set[str] = set()

    def find(self, public: str, *, provider: str = "", upstream: str = "") -> ModelPrice:
        """The price of a call to ``public`` answered by deployment ``provider``/``upstream``."""
        k = (public, provider, upstream)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        price: ModelPrice | None = None
        if provider and upstream:
            price = self._overrides.get(f"{provider}/{upstream}")
        for name in (upstream, public) if upstream else (public,):
            if price is not None:
                break
            price = _lookup(self._overrides, name) or _lookup(_DEFAULTS, name)
        if price is None:
            price = ZERO
            what = f"{provider}/{upstream}" if upstream else public
            if what not in self._warned:
                self._warned.add(what)
                log.warning(
                    "no price for model; its calls cost 0 and USD budgets do not limit it",
                    extra={"fields": {"model": public, "deployment": what}},
                )
        self._cache[k] = price
        return price

    def deployment_prices(self, model: ModelConfig) -> tuple[ModelPrice, ...]:
        """Each of ``model``'s deployments' prices (cached: admission asks on every call)."""
        hit = self._by_model.get(model.name)
        if hit is not None and hit[0] is model:
            return hit[1]
        prices = tuple(self.find(model.name, provider=d.provider, upstream=d.model) for d in model.deployments)
        self._by_model[model.name] = (model, prices)
        return prices

    def reserve_cost(self, model: ModelConfig, *, prompt: int, completion: int) -> float:
        """What to reserve in USD budgets: the dearest deployment's cost, since any may answer."""
        return max(
            (cost_usd(p, prompt=prompt, completion=completion) for p in self.deployment_prices(model)),
            default=0.0,
        )
