"""Who a caller is (``Principal``) and where their credential is in a request."""


from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import Budget, RateLimits
from ._keys import KeyRecord


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
