"""Errors as the caller's API shapes them: OpenAI's ``{"error": {...}}`` or Anthropic's
``{"type": "error", ...}`` on ``/v1/messages``; the one place a ``HapaxError`` becomes bytes."""

from __future__ import annotations

from typing import Any

import orjson

from .._errors import HapaxError
from .._exchange import Exchange
from .._http import Response
from .._sse import encode

_JSON = "application/json"


def error_response(ex: Exchange, exc: HapaxError) -> Response:
    """The error response for ``exc``: the body in the caller's API format, and the headers
    saying where the attempts went."""
    ex.error = exc
    headers = {"content-type": _JSON}
    if ex.ratelimit_headers:
        headers.update(ex.ratelimit_headers)
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    if exc.tried:
        # Upstream attempts all failed: say where they went and why, as a success would.
        last = exc.tried[-1][0]
        provider, _, upstream = last.partition("/")
        headers["x-hapax-provider"] = provider
        headers["x-hapax-upstream-model"] = upstream
        headers["x-hapax-deployment"] = last
        headers["x-hapax-attempts"] = str(len(exc.tried))
        headers["x-hapax-attempted"] = ", ".join(f"{d}={code}" for d, code, _ in exc.tried)
        ex.attempts = len(exc.tried)
        ex.deployment, ex.provider = last, provider
        ex.upstream_seconds = exc.upstream_seconds
    return Response(exc.status, headers, error_body(exc, ex.request_id, ex.anthropic))


def stream_error(ex: Exchange, exc: HapaxError) -> bytes:
    """The SSE event that ends a stream with ``exc``."""
    body = error_body(exc, ex.request_id, ex.anthropic)
    return encode(body, "error") if ex.anthropic else encode(body)


def error_body(exc: HapaxError, request_id: str, anthropic: bool) -> bytes:
    err: dict[str, Any]
    if anthropic:
        err = {"type": exc.anthropic_type, "message": exc.message}
        doc: dict[str, Any] = {"type": "error", "error": err, "request_id": request_id}
    else:
        err = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code,
               "request_id": request_id}
        doc = {"error": err}
    if exc.tried:
        # An extra field beside the provider's own: SDKs keep unknown fields of an error body.
        err["attempts"] = [{"deployment": d, "code": code, "status": status} for d, code, status in exc.tried]
    return orjson.dumps(doc)
