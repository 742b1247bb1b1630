"""Authentication (who is calling: 401) and authorization by role (403)."""


from __future__ import annotations

import hmac

from .._errors import AuthenticationFailed, PermissionDenied
from .._exchange import Exchange
from .._http import Request
from ._core import AccessCore
from ._keys import KeyRecord, hash_secret
from ._principal import ANONYMOUS, BOOTSTRAP_ADMIN, Principal, credential, principal_of
from ._roles import Permission, allowed


class Authentication(AccessCore):
    # -- authentication ----------------------------------------------------------------

    async def authenticate(self, req: Request, ex: Exchange) -> Principal:
        if self.config.auth.mode == "none":
            return ANONYMOUS
        return await self.identify_async(req, ex)

    def identify(self, req: Request, ex: Exchange) -> Principal:
        """The principal behind the request's credential, in any auth mode; 401 if none.

        Answers from the local copy of the key store only; ``identify_async`` also asks a
        shared store about a credential the copy does not know yet.
        """
        digest = self._digest(req, ex)
        if digest is None:
            return BOOTSTRAP_ADMIN
        return self._principal(self.keys.by_hash(digest), ex)

    async def identify_async(self, req: Request, ex: Exchange) -> Principal:
        digest = self._digest(req, ex)
        if digest is None:
            return BOOTSTRAP_ADMIN
        rec = self.keys.by_hash(digest)
        if rec is None:
            rec = await self.keys.fetch(digest)  # a key made on another node a moment ago
        return self._principal(rec, ex)

    def _digest(self, req: Request, ex: Exchange) -> str | None:
        """The credential's SHA-256; ``None`` for the bootstrap admin key; 401 when there is none."""
        secret = credential(req.headers)
        if secret is None:
            self._auth_failed(ex, "missing")
            raise AuthenticationFailed(
                "no API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'", code="missing_api_key"
            )
        digest = hash_secret(secret)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return None
        return digest

    def _principal(self, rec: KeyRecord | None, ex: Exchange) -> Principal:
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
        self.audit.auth_failed(
            reason=reason, actor=key_id or "unknown", remote=ex.remote, request_id=ex.request_id, path=ex.path,
        )

    # -- authorization -----------------------------------------------------------------

    async def authorize(self, req: Request, ex: Exchange, permission: Permission) -> Principal:
        """Gate an operator view outside ``/admin`` (``GET /v1/health/providers``) by role.

        With ``auth.mode: none`` it stays open like the rest of the demo; with keys,
        no credential is 401 and a role without ``permission`` is 403.
        """
        if self.config.auth.mode == "none":
            return ANONYMOUS
        who = await self.identify_async(req, ex)
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
