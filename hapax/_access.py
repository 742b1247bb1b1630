"""Who is calling, and may they: authentication, limits, quotas, budgets.

Theory of operation: the gateway asks ``AccessControl`` three things per
model call. ``authenticate`` turns the request's credential into a
``Principal`` (or refuses). ``admit`` checks the principal may use the model
and reserves what the call may consume (rate limits, tokens, budget),
returning an ``Admission`` whose headers go on the response. ``settle`` is
called exactly once when the call ends, however it ends, with the real usage.

Today auth is ``none``: everyone is the anonymous principal and nothing is
limited. Keys, roles, rate limits, quotas, budgets and audit come in issue [3].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._config import ModelConfig
from ._exchange import Exchange
from ._http import Request, Response
from ._usage import Usage


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: str = "admin"
    team: str | None = None
    #: Highest priority this caller may ask for with ``x-hapax-priority`` (0 is highest).
    max_priority: int = 0
    default_priority: int = 5


ANONYMOUS = Principal(id="anonymous")


@dataclass(slots=True)
class Admission:
    principal: Principal
    #: Headers for the response (``x-ratelimit-*``).
    headers: dict[str, str] = field(default_factory=dict)


class AccessControl:
    async def authenticate(self, req: Request, ex: Exchange) -> Principal:
        return ANONYMOUS

    async def admit(
        self, principal: Principal, model: ModelConfig, body: dict[str, Any], ex: Exchange
    ) -> Admission:
        return Admission(principal)

    def settle(self, admission: Admission, usage: Usage | None, ex: Exchange) -> None:
        return None

    async def handle_admin(self, req: Request, ex: Exchange) -> Response | None:
        """Answer ``/admin/...`` routes; ``None`` when the path is not one."""
        return None

    async def aclose(self) -> None:
        return None
