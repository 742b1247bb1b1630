"""Who is calling, and may they: authentication, limits, quotas, budgets, usage.

Theory of operation: the gateway asks ``AccessControl`` three things per
model call. ``authenticate`` turns the request's credential into a
``Principal`` (or refuses, 401). ``admit`` checks the principal's role and
model allowlist (403), then reserves what the call may consume with one
``reserve`` of an ``Ask`` covering every scope (``hapax.state``: key, team and
global rate limits, concurrency, budgets): all of it or nothing, atomic in the
backend the composition root chose (memory, or Redis shared by every node).
``admit`` returns an ``AccessGrant`` whose headers (``x-ratelimit-*``) go on
the response; it also leaves them on the ``Exchange``, refusals included, so
a 429 or a later error carries them as a success does (not on the exception:
deduplicated callers share one). ``settle`` is called exactly once when the
call ends, however it ends, with the real usage: it prices the call, corrects
the token buckets, moves the budget reservation to spent, and adds a usage row.
The state settlement is committed when ``settle`` is called; what it returns
only waits for the shared state to have it.

Auth modes: ``none`` (everyone is the anonymous principal; only global
limits apply; the admin API still needs the bootstrap admin key) and
``keys`` (every call needs an API key from the key store, or the bootstrap
admin key from config). State lives under ``auth.state_dir`` (keys, usage,
audit) or in memory when it is unset; the composition root may hand in a
shared key store and usage store instead (``_keys_redis``, ``_usage_redis``),
and then ``state_dir`` holds the audit log only.

What is charged: the provider's reported usage; when a stream ended before
usage arrived but after output began, the larger of the estimate and what was
counted (a client cannot dodge its budget by hanging up); nothing when the
call failed before any output.
"""

from __future__ import annotations

from .._exchange import Exchange
from .._http import Request, Response
from ._principal import ANONYMOUS, credential
from ._settle import Settlement


class AccessControl(Settlement):
    """Assembled in request order: ``_core`` (state), ``_authenticate``, ``_grant`` (limits and
    budgets), ``_settle``, and here the admin API's dispatch."""

    # -- admin API ---------------------------------------------------------------------

    async def handle_admin(self, req: Request, ex: Exchange) -> Response | None:
        """Answer ``/admin/...`` routes; ``None`` when the path is not one."""
        from ._admin import handle

        return await handle(self, req, ex)

    async def me(self, req: Request, ex: Exchange) -> Response:
        """``GET /v1/me``: the caller's own key, limits, budget and usage (``hapax.access._admin.me``)."""
        from ._admin import me

        if self.config.auth.mode == "none" and credential(req.headers) is None:
            who = ANONYMOUS
        else:
            who = await self.identify_async(req, ex)
        ex.principal = who.id
        return await me(self, who)

    def key_changed(self) -> None:
        self._bind_teams()
