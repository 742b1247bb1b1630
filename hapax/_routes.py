"""The built-in routes: health, readiness, metrics, the model list, ``/v1/me``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from ._access_log import AccessLog
from ._errors import MethodNotAllowed, ModelNotFound, RouteNotFound
from ._exchange import Exchange
from ._http import Request, Response
from ._metrics import Exposition, Snapshot
from .access import AccessControl, Permission
from .routing import Dispatcher, Runtime

_JSON = "application/json"


class BuiltinRoutes(AccessLog):
    """The routes of ``Gateway`` that call no model."""

    # Set by ``Gateway.__init__``.
    runtime: Runtime
    access: AccessControl
    dispatcher: Dispatcher
    started_at: int
    draining: bool
    exposition: Exposition
    metrics_peers: Callable[[], Awaitable[Sequence[Snapshot]]] | None

    async def _builtin(self, req: Request, ex: Exchange) -> Response:
        path = req.path
        if path in (
            "/health/live", "/health/ready", "/metrics", "/v1/models", "/v1/health/providers", "/v1/me"
        ) or path.startswith("/v1/models/"):
            if req.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{path} accepts GET only")
        else:
            raise RouteNotFound(f"no route for {req.method} {path}")
        if path == "/health/live":
            return _json(200, {"status": "live"})
        if path == "/health/ready":
            return self._ready()
        if path == "/v1/health/providers":
            # Operators' view of every deployment (upstream errors, load): with auth.mode keys
            # it needs "view cluster", like /admin/cluster; with none it stays open.
            await self.access.authorize(req, ex, Permission.VIEW_CLUSTER)
            return _json(200, self.dispatcher.snapshot(self.runtime))
        rt = self.runtime
        if path == "/v1/models":
            # Aliases are listed too: a client that discovers models here can call any name it sees.
            data = [self._model_entry(n, m.owned_by) for m in rt.config.models for n in (m.name, *m.aliases)]
            return _json(200, {"object": "list", "data": data})
        public = path[len("/v1/models/") :]
        m = rt.models.get(public)
        if m is None:
            raise ModelNotFound(f"the model '{public}' does not exist", param="model")
        return _json(200, self._model_entry(public, m.owned_by))

    async def _metrics_page(self, req: Request) -> Response:
        peers = await self.metrics_peers() if self.metrics_peers is not None else ()
        # Copied on the loop, encoded in a thread: thousands of series take milliseconds.
        body, content_type = await asyncio.to_thread(
            self.exposition.encode, self.exposition.freeze(), req.headers.get("accept"), peers
        )
        return Response(200, {"content-type": content_type}, body)

    def _model_entry(self, name: str, owned_by: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started_at, "owned_by": owned_by}

    def _ready(self) -> Response:
        rt = self.runtime
        providers = {
            name: {"type": p.type, "models": sorted(
                m.name for m in rt.config.models if any(d.provider == name for d in m.deployments)
            )}
            for name, p in rt.providers.items()
        }
        health = self.dispatcher.snapshot(rt)
        for name, info in providers.items():
            info["probe"] = health["providers"].get(name, {}).get("probe", "disabled")
        status = "draining" if self.draining else "ready"
        body = {
            "status": status,
            "config_generation": rt.generation,
            "config": {"revision": rt.revision, "source": rt.snapshot.source, "digest": rt.snapshot.digest},
            "providers": providers,
            # Readiness is the node's own: a failing provider is routed around, not a reason
            # for the load balancer to drop every node at once.
            "deployments": {d["deployment"]: d["state"] for d in health["deployments"]},
        }
        return _json(503 if self.draining else 200, body)


def _route_name(path: str) -> str:
    if path.startswith("/v1/models"):
        return "models"
    if path.startswith(("/health/", "/v1/health/")):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path == "/v1/me":
        return "me"
    return "unknown"


def _json(status: int, body: Any) -> Response:
    return Response(status, {"content-type": _JSON}, orjson.dumps(body))
