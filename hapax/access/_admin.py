"""The admin API under ``/admin``: keys, usage, config, cluster.

Theory of operation: every route names the one permission it needs
(``ROUTES``); the caller is identified from their credential in any auth
mode (with ``auth.mode: none`` only the bootstrap admin key or a stored key
gets in) and checked against the role table in ``hapax.access._roles``. Every
admin call is audited (``admin.request``, or ``admin.denied`` when the role
lacks the permission), and every change is audited with its own event.

    GET    /admin/whoami                 any valid key
    GET    /admin/keys                   manage_keys   ?team=&include_revoked=true
    POST   /admin/keys                   manage_keys   201, the secret once
    GET    /admin/keys/{id}              manage_keys
    PATCH  /admin/keys/{id}              manage_keys
    POST   /admin/keys/{id}/rotate       manage_keys   the new secret once; the old one stops at once
    POST   /admin/keys/{id}/revoke       manage_keys   (also DELETE /admin/keys/{id})
    GET    /admin/usage                  read_usage    ?key=&team=&model=&deployment=&from=&to=&group_by=
                                                       &format=json|csv

``{id}`` is a key's id or its name (unique among active keys; 409 when it is not).
    GET    /admin/config                 manage_config the config in force, secrets redacted
    GET    /admin/cluster                view_cluster  members, leader, revisions (this node alone without etcd)
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._errors import BadRequest, InvalidField, InvalidJSON, MethodNotAllowed, NotFound
from .._exchange import Exchange
from .._http import Request, Response
from ..config import Budget, RateLimits
from ._keys import KeyRecord, Role, hash_secret, hint_of, iso_utc, mint_secret, new_key_id
from ._roles import ROLE_PERMISSIONS, Permission
from ._usage_ledger import GROUPS, ROW_FIELDS, SUMS, group, to_csv

if TYPE_CHECKING:
    from ._control import AccessControl
    from ._principal import Principal

_JSON = {"content-type": "application/json"}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    owner: str = Field("", max_length=200)
    team: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    role: Role = "developer"
    models: list[str] | None = None
    limits: RateLimits = Field(default_factory=RateLimits)
    budget: Budget = Field(default_factory=Budget)
    max_priority: int = Field(0, ge=0, le=9)
    default_priority: int = Field(5, ge=0, le=9)
    expires_at: datetime | None = Field(None, description="ISO 8601 (UTC if no offset) or Unix seconds")
    expires_in_days: float | None = Field(None, gt=0)


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    owner: str | None = Field(None, max_length=200)
    team: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    role: Role | None = None
    models: list[str] | None = None
    limits: RateLimits | None = None
    budget: Budget | None = None
    max_priority: int | None = Field(None, ge=0, le=9)
    default_priority: int | None = Field(None, ge=0, le=9)
    expires_at: datetime | None = Field(None, description="ISO 8601 (UTC if no offset) or Unix seconds")


Handler = Callable[["AccessControl", Request, Exchange, "Principal", str], Awaitable[Response]]


def _json(status: int, body: Any) -> Response:
    return Response(status, dict(_JSON), orjson.dumps(body))


def _body(req: Request) -> Any:
    if not req.body:
        return {}
    try:
        return orjson.loads(req.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidField(f"{loc}: {msg}", param=loc or None) from None


def _epoch(t: datetime | None) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def find_key(ac: AccessControl, ref: str) -> KeyRecord | None:
    """The key whose id is ``ref``, else the one whose name is (an active one before revoked ones).

    Raises a 409 when several keys share the name: the caller must say which, by id.
    """
    rec = ac.keys.get(ref)
    if rec is not None:
        return rec
    named = [r for r in ac.keys.all() if r.name == ref]
    live = [r for r in named if not r.revoked] or named
    if len(live) > 1:
        raise InvalidField(
            f"{len(live)} keys are named '{ref}' ({', '.join(r.id for r in live)}); name one by its id",
            param="key", code="ambiguous_key_name", status=409,
        )
    return live[0] if live else None


def _get(ac: AccessControl, ref: str) -> KeyRecord:
    rec = find_key(ac, ref)
    if rec is None:
        raise NotFound(f"no key with id or name '{ref}'", code="key_not_found")
    return rec


def _check_models(ac: AccessControl, models: list[str] | None) -> tuple[str, ...] | None:
    if models is None or not ac.check_models:
        return tuple(models) if models is not None else None
    known = {n for m in ac.config.models for n in (m.name, *m.aliases)}
    unknown = [m for m in models if m not in known]
    if unknown:
        raise InvalidField(f"unknown models: {unknown}; configured: {sorted(known)}", param="models")
    return tuple(models)


def _audit(ac: AccessControl, event: str, ex: Exchange, who: Principal, target: str | None, **details: Any) -> None:
    ac.audit.record(event, actor=who.id, remote=ex.remote, request_id=ex.request_id, target=target,
                    details=details)


# -- handlers ----------------------------------------------------------------------------


async def whoami(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    return _json(200, {
        "id": who.id, "name": who.name, "role": who.role, "team": who.team,
        "permissions": sorted(p.value for p in ROLE_PERMISSIONS.get(who.role, frozenset())),
        "models": sorted(who.models) if who.models is not None else None,
    })


async def list_keys(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    team = req.query.get("team")
    include_revoked = req.query.get("include_revoked", "").lower() in ("1", "true", "yes")
    await ac.keys.refreshed()
    data = [
        r.public() for r in ac.keys.all()
        if (team is None or r.team == team) and (include_revoked or not r.revoked)
    ]
    return _json(200, {"object": "list", "data": data})


async def create_key(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    spec: KeyCreate = _validate(KeyCreate, _body(req))
    now = ac._now()
    expires = _epoch(spec.expires_at)
    if spec.expires_in_days is not None:
        expires = now + spec.expires_in_days * 86400
    secret = mint_secret()
    rec = KeyRecord(
        id=new_key_id(), name=spec.name, owner=spec.owner, team=spec.team, role=spec.role,
        models=_check_models(ac, spec.models), limits=spec.limits, budget=spec.budget,
        max_priority=spec.max_priority, default_priority=spec.default_priority,
        expires_at=expires, created_at=now, hash=hash_secret(secret), hint=hint_of(secret),
    )
    await ac.keys.save(rec)
    ac.key_changed()
    _audit(ac, "key.created", ex, who, rec.id, name=rec.name, owner=rec.owner, team=rec.team, role=rec.role)
    return _json(201, {**rec.public(), "key": secret,
                       "warning": "store this key now: it is shown only once"})


async def show_key(ac: AccessControl, req: Request, ex: Exchange, who: Principal, key_id: str) -> Response:
    await ac.keys.refreshed()
    return _json(200, _get(ac, key_id).public())


async def update_key(ac: AccessControl, req: Request, ex: Exchange, who: Principal, key_id: str) -> Response:
    rec = _get(ac, key_id)
    spec: KeyUpdate = _validate(KeyUpdate, _body(req))
    changes: dict[str, Any] = {}
    for name in spec.model_fields_set:
        value = getattr(spec, name)
        if name == "models":
            value = _check_models(ac, value)
        elif name == "expires_at":
            value = _epoch(value)
        elif value is None and name not in ("team", "expires_at"):
            raise InvalidField(f"{name} cannot be null", param=name)
        changes[name] = value
    new = rec.model_copy(update=changes)
    KeyRecord.model_validate(new.model_dump())  # the update must still make a valid record
    await ac.keys.save(new)
    ac.key_changed()
    _audit(ac, "key.updated", ex, who, rec.id, fields=sorted(changes))
    if "role" in changes and changes["role"] != rec.role:
        _audit(ac, "key.role_changed", ex, who, rec.id, **{"from": rec.role, "to": new.role})
    return _json(200, new.public())


async def rotate_key(ac: AccessControl, req: Request, ex: Exchange, who: Principal, key_id: str) -> Response:
    rec = _get(ac, key_id)
    if rec.revoked:
        raise BadRequest(f"key '{key_id}' is revoked; create a new one", code="key_revoked")
    secret = mint_secret()
    new = rec.model_copy(update={"hash": hash_secret(secret), "hint": hint_of(secret), "rotated_at": ac._now()})
    await ac.keys.save(new)
    _audit(ac, "key.rotated", ex, who, rec.id)
    return _json(200, {**new.public(), "key": secret, "warning": "store this key now: it is shown only once"})


async def revoke_key(ac: AccessControl, req: Request, ex: Exchange, who: Principal, key_id: str) -> Response:
    rec = _get(ac, key_id)
    if not rec.revoked:
        rec = rec.model_copy(update={"revoked_at": ac._now()})
        await ac.keys.save(rec)
        _audit(ac, "key.revoked", ex, who, rec.id)
    return _json(200, rec.public())


async def usage(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    q = req.query
    since, until = q.get("from"), q.get("to")
    for name, v in (("from", since), ("to", until)):
        if v is not None and not _DAY.match(v):
            raise InvalidField(f"{name} must be a day, YYYY-MM-DD", param=name)
    key = q.get("key")
    if key is not None:
        rec = find_key(ac, key)  # a name is as good as an id
        key = rec.id if rec is not None else key
    by = tuple(d.strip() for d in q.get("group_by", "").split(",") if d.strip())
    if any(d not in GROUPS for d in by) or len(set(by)) != len(by):
        raise InvalidField(f"group_by takes a comma-separated subset of {', '.join(GROUPS)}", param="group_by")
    rows = await ac.usage_rows(key=key, team=q.get("team"), model=q.get("model"), since=since, until=until,
                               deployment=q.get("deployment"))
    if by:
        rows = group(rows, by)
    if not by or "key" in by:
        names: dict[str, str] = {}
        for r in rows:
            if r["key"] not in names:
                rec = ac.keys.get(r["key"])
                names[r["key"]] = rec.name if rec is not None else ""
            r["key_name"] = names[r["key"]]
    fmt = q.get("format", "json")
    if fmt == "csv":
        # key_name last: scripts reading the earlier columns by position keep working.
        fields = (*(by or ROW_FIELDS[:5]), *SUMS, *(("key_name",) if not by or "key" in by else ()))
        return Response(200, {"content-type": "text/csv; charset=utf-8"}, to_csv(rows, fields).encode())
    if fmt != "json":
        raise InvalidField("format must be json or csv", param="format")
    totals = {k: sum(r[k] for r in rows) for k in SUMS}
    totals["cost_usd"] = round(totals["cost_usd"], 8)
    return _json(200, {"object": "list", "data": rows, "totals": totals})


async def me(ac: AccessControl, who: Principal) -> Response:
    """``GET /v1/me``: the caller's own key, limits and what is left of them, budget, usage.

    Any valid key may ask, about itself only: a developer sees where they stand
    without the ``read_usage`` permission that shows everyone's.
    """
    from ..state import BudgetScope, Scope, day_of, format_duration, month_of

    now = ac._now()
    cfg = ac.config
    rec = ac.keys.get(who.id) if who.is_key else None
    models = sorted(who.models) if who.models is not None else [m.name for m in cfg.models]
    scopes: list[tuple[str, str, Any, Any]] = []  # kind, id, limits, budget
    if who.is_key:
        scopes.append(("key", who.id, who.limits, who.budget))
    team_cfg = cfg.teams.get(who.team) if who.team else None
    if team_cfg is not None and who.team:
        scopes.append(("team", who.team, team_cfg.limits, team_cfg.budget))
    scopes.append(("global", "", cfg.limits, None))
    rate = tuple(Scope(kind, id_, lim) for kind, id_, lim, _ in scopes if lim.any())
    budget_scopes = tuple(BudgetScope(kind, id_, b) for kind, id_, _, b in scopes if b is not None and b.any())
    view = await ac.state.view(rate, budget_scopes)
    today, month = day_of(now), month_of(now)
    limits, budgets = [], []
    for kind, id_, lim, budget in scopes:
        if lim.any():
            v = view.rate[(kind, id_)]
            entry: dict[str, Any] = {"scope": kind, "id": id_ or None}
            if lim.requests_per_minute is not None and v.requests_remaining is not None:
                entry["requests_per_minute"] = {"limit": lim.requests_per_minute,
                                                "remaining": max(0, math.floor(v.requests_remaining)),
                                                "reset": format_duration(v.requests_reset)}
            if lim.tokens_per_minute is not None and v.tokens_remaining is not None:
                entry["tokens_per_minute"] = {"limit": lim.tokens_per_minute,
                                              "remaining": max(0, math.floor(v.tokens_remaining)),
                                              "reset": format_duration(v.tokens_reset)}
            if lim.concurrent is not None:
                entry["concurrent"] = {"limit": lim.concurrent, "in_flight": v.in_flight,
                                       "remaining": max(0, lim.concurrent - v.in_flight)}
            limits.append(entry)
        if budget is not None and budget.any():
            b: dict[str, Any] = {"scope": kind, "id": id_}
            for name, period, measure in (("daily_tokens", today, 0), ("monthly_tokens", month, 0),
                                          ("daily_usd", today, 1), ("monthly_usd", month, 1)):
                cap = getattr(budget, name)
                if cap is not None:
                    used = view.used.get((kind, id_, period), (0.0, 0.0))[measure]  # spent plus reserved
                    b[name] = {"period": period, "cap": cap, "used": round(used, 8),
                               "remaining": round(max(0.0, cap - used), 8)}
            budgets.append(b)
    summary = {}
    month_rows = await ac.usage_rows(key=who.id, since=month + "-01")  # one read; today is in it
    for label, since in (("today", today), ("month", month + "-01")):
        rows = [r for r in month_rows if r["day"] >= since]
        summary[label] = {k: (round(sum(r[k] for r in rows), 8) if k == "cost_usd" else sum(r[k] for r in rows))
                          for k in ("requests", "refused", "errors", "total_tokens", "cost_usd")}
    return _json(200, {
        "object": "key", "id": who.id, "name": who.name, "role": who.role, "team": who.team,
        "created_at": iso_utc(rec.created_at) if rec else None,
        "expires_at": iso_utc(rec.expires_at) if rec else None,
        "last_used_at": iso_utc(rec.last_used_at) if rec else None,
        "models": models, "limits": limits, "budget": budgets, "usage": summary,
        "now": iso_utc(now),
    })


async def show_config(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    doc = ac.config.model_dump(mode="json")  # SecretStr values dump as '**********'
    for p in doc.get("providers", {}).values():
        # Extra upstream headers often carry credentials too.
        p["headers"] = {k: "**********" for k in p.get("headers", {})}
        if p.get("base_url"):
            p["base_url"] = _redact_url(p["base_url"])
    return _json(200, doc)


def _redact_url(url: str) -> str:
    """``url`` without userinfo or query values: proxies take ``user:pass@`` and ``?key=`` credentials."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "**********@" + netloc.rpartition("@")[2]
    query = "&".join(f"{k}=**********" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


async def cluster(ac: AccessControl, req: Request, ex: Exchange, who: Principal, _: str) -> Response:
    if ac.cluster_view is not None:  # a cluster member: the cluster as it sees it (memory, not etcd)
        return _json(200, ac.cluster_view())
    return _json(200, {"nodes": [{
        "id": ac.node_id, "started_at": iso_utc(ac.started_at), "auth_mode": ac.config.auth.mode,
        "state": "redis" if ac.shared_usage is not None else "memory" if ac.state_dir is None else "local",
    }]})


#: (method, path pattern, permission or None for any valid key, handler)
ROUTES: tuple[tuple[str, str, Permission | None, Handler], ...] = (
    ("GET", "/admin/whoami", None, whoami),
    ("GET", "/admin/keys", Permission.MANAGE_KEYS, list_keys),
    ("POST", "/admin/keys", Permission.MANAGE_KEYS, create_key),
    ("GET", "/admin/keys/{id}", Permission.MANAGE_KEYS, show_key),
    ("PATCH", "/admin/keys/{id}", Permission.MANAGE_KEYS, update_key),
    ("DELETE", "/admin/keys/{id}", Permission.MANAGE_KEYS, revoke_key),
    ("POST", "/admin/keys/{id}/rotate", Permission.MANAGE_KEYS, rotate_key),
    ("POST", "/admin/keys/{id}/revoke", Permission.MANAGE_KEYS, revoke_key),
    ("GET", "/admin/usage", Permission.READ_USAGE, usage),
    ("GET", "/admin/config", Permission.MANAGE_CONFIG, show_config),
    ("GET", "/admin/cluster", Permission.VIEW_CLUSTER, cluster),
)

#: A key id or a key name (URL-encoded by the client; the front door decodes the path).
_ID = r"([^/]+)"
_COMPILED = [
    (method, re.compile("^" + pattern.replace("{id}", _ID) + "$"), perm, fn)
    for method, pattern, perm, fn in ROUTES
]


async def handle(ac: AccessControl, req: Request, ex: Exchange) -> Response | None:
    path = req.path.rstrip("/")
    matches = [(m, rx.match(path), perm, fn) for m, rx, perm, fn in _COMPILED]
    matches = [x for x in matches if x[1] is not None]
    if not matches:
        return None
    ex.route = "admin"
    who = await ac.identify_async(req, ex)
    ex.principal = who.id
    method = "GET" if req.method == "HEAD" else req.method
    for m, match, perm, fn in matches:
        if m != method:
            continue
        assert match is not None
        if perm is not None:
            ac.require(who, perm, ex, method=req.method, path=path)
        _audit(ac, "admin.request", ex, who, None, method=req.method, path=path)
        return await fn(ac, req, ex, who, match.group(1) if match.groups() else "")
    allowed = sorted({m for m, *_ in matches})
    raise MethodNotAllowed(f"{path} accepts {', '.join(allowed)}")
