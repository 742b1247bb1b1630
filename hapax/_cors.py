"""CORS: which browser origins may read a response, and the preflight answer."""

from __future__ import annotations

from ._http import Request, Response
from .config import Config


def add_cors(config: Config, req: Request, resp: Response) -> None:
    """The CORS headers ``server.cors`` (and, for /admin, ``auth.admin_cors_origins``) allow."""
    cors = config.server.cors
    origin = req.headers.get("origin")
    if not origin:
        return
    if req.path.startswith("/admin") and origin not in config.auth.admin_cors_origins:
        return  # browsers may not call the admin API unless an origin is named for it
    if "*" in cors.allow_origins:
        resp.headers["access-control-allow-origin"] = "*"
    elif origin in cors.allow_origins:
        resp.headers["access-control-allow-origin"] = origin
        resp.headers["vary"] = "origin"
    else:
        return
    resp.headers["access-control-expose-headers"] = ", ".join(cors.expose_headers)
    if req.method == "OPTIONS":
        resp.headers["access-control-allow-methods"] = ", ".join(cors.allow_methods)
        resp.headers["access-control-allow-headers"] = ", ".join(cors.allow_headers)
        resp.headers["access-control-max-age"] = str(cors.max_age)
