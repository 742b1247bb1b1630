"""What a translation does with each request field: carry it, or refuse it.

Theory of operation: docs/api.md promises that a request the target cannot
express fails with a 400 naming the field rather than being answered
differently. So every translator (and the Gemini adapter, which converts
inside ``send``) lists the fields it knows, and ``refuse_unknown`` checks a
body against that list before anything is spent upstream:

- a field in ``known`` is carried (translated) or has no effect on the answer
  (a bookkeeping tag such as OpenAI's ``metadata``); each translator's table
  says which, and docs/api.md repeats it;
- a field in ``neutral`` is accepted only with a value that asks for what the
  target does anyway (``n: 1``, ``presence_penalty: 0``, ``logprobs: false``);
- ``null`` is the same as absent in both APIs, so it always passes;
- anything else, including fields Hapax has never heard of, is refused with
  ``unsupported_parameter`` and ``param`` naming it. Pass-through is not
  affected: there a new field reaches the provider untouched.

Also here, because Anthropic and Gemini both count reasoning in tokens while
OpenAI names an effort: one table from ``reasoning_effort`` to a thinking
budget, and its inverse. The budgets are the ones Google documents for its own
OpenAI-compatible endpoint, so a Gemini deployment behind Hapax thinks as it
would behind Google's; Anthropic gets the same numbers (1024 is its minimum).

Pure: dicts in, an exception or nothing out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._errors import InvalidField

#: ``reasoning_effort`` -> thinking budget in tokens. ``none`` means no thinking.
REASONING_BUDGETS: dict[str, int] = {"minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}
REASONING_EFFORTS = frozenset({"none", *REASONING_BUDGETS})


def reasoning_budget(effort: Any) -> int | None:
    """The thinking budget for an OpenAI ``reasoning_effort``; ``None`` for ``none``."""
    if effort not in REASONING_EFFORTS:
        raise InvalidField(
            f"'reasoning_effort' must be one of {', '.join(sorted(REASONING_EFFORTS))}",
            param="reasoning_effort",
        )
    return REASONING_BUDGETS.get(effort)


def reasoning_effort(budget: int) -> str:
    """The OpenAI effort closest to a thinking budget: the inverse of ``REASONING_BUDGETS``.

    Only low/medium/high come back: every OpenAI reasoning model takes those,
    while ``minimal`` is GPT-5's alone.
    """
    if budget <= REASONING_BUDGETS["low"]:
        return "low"
    if budget <= REASONING_BUDGETS["medium"]:
        return "medium"
    return "high"


def cache_control(value: Any, where: str) -> dict[str, Any]:
    """A checked copy of a ``cache_control`` marker (Anthropic's shape, which OpenAI-format
    clients borrow): ``{"type": "ephemeral"}`` with an optional ``ttl``."""
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise InvalidField(f"{where}.cache_control must be {{\"type\": \"ephemeral\"}}",
                           param=f"{where}.cache_control")
    out: dict[str, Any] = {"type": "ephemeral"}
    ttl = value.get("ttl")
    if ttl is not None:
        if ttl not in ("5m", "1h"):
            raise InvalidField(f"{where}.cache_control.ttl must be '5m' or '1h'", param=f"{where}.cache_control")
        out["ttl"] = ttl
    return out


Neutral = Mapping[str, Callable[[Any], bool]]

#: OpenAI chat fields whose value, when it is this, asks for nothing a provider without
#: them would do differently.
CHAT_NEUTRAL: Neutral = {
    "n": lambda v: v == 1,
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "modalities": lambda v: v == ["text"],
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "store": lambda v: v is False,
    "parallel_tool_calls": lambda v: v is True,
    "service_tier": lambda v: v in ("auto", "default"),
}


def refuse_unknown(body: Mapping[str, Any], known: frozenset[str], neutral: Neutral, target: str) -> None:
    """Raise ``InvalidField`` for the first field of ``body`` that ``target`` cannot carry."""
    for key, value in body.items():
        if key in known or value is None:
            continue
        ok = neutral.get(key)
        if ok is not None and ok(value):
            continue
        if ok is not None:
            msg = f"'{key}' with the value {_short(value)} cannot be translated for {target}"
        else:
            msg = f"'{key}' is not supported when this model is served by {target}"
        raise InvalidField(msg + "; remove it or use a model that takes it", param=key,
                           code="unsupported_parameter")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
