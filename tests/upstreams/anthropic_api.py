"""An upstream that speaks Anthropic's Messages API (``POST /v1/messages``).

Non-stream replies are ``message`` objects; streams are the documented event
sequence, each with its ``event:`` line: ``message_start``, then per content
block ``content_block_start`` / ``content_block_delta`` (``text_delta`` or
``input_json_delta`` fragments, or a ``thinking`` block's ``thinking_delta``
and ``signature_delta`` when ``thinking`` is enabled) / ``content_block_stop``, a ``ping``,
``message_delta`` with ``stop_reason`` and output usage, ``message_stop``.
Errors use Anthropic's body ``{"type": "error", "error": {"type", "message"}}``.

Like the real API it refuses a request without ``x-api-key`` (401) or
``anthropic-version`` (400), without ``max_tokens``, with a ``system`` role
inside ``messages``, with a ``tool_result`` that answers no ``tool_use`` of
the previous assistant turn, or with a thinking budget under 1024 or not below
``max_tokens``. A request holding any ``cache_control`` marker reports
``CACHED_TOKENS`` as ``cache_read_input_tokens``.

When the request has tools (and ``tool_choice`` is not ``none``) and its last
turn is not a tool result, the reply is a short text block followed by a
``tool_use`` of the first tool with input ``{"city": "Paris"}``.

``state.faults`` scripts misbehaviour:

    {"status": 400, "message": "..."}   an error status with Anthropic's error body
    {"status": 529}                     overloaded_error
    {"status": 429, "retry_after": 2}   rate limited, with Retry-After
    {"hang": 5}                         sleep before answering
    {"reset": True}                     close the connection without a response
    {"truncate_stream_after": 2}        stream N events, then cut the connection
    {"error_event_after": 2}            stream N events, then an ``error`` event
    {"malformed": True}                 a 200 whose body is not JSON
    {"chunk_delay": 0.01}               sleep between stream events
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .server import Seen, UpstreamState

STATE = web.AppKey("anthropic_state", UpstreamState)

INPUT_TOKENS = 12
CACHED_TOKENS = 8
THINKING = "Let me think."
TOOL_PREAMBLE = "Let me check."
TOOL_INPUT_FRAGMENTS = ('{"city": ', '"Paris"}')

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
          500: "api_error", 529: "overloaded_error"}


def error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message},
                         "request_id": "req_upstream1"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(_KINDS.get(status, "api_error"), message),
                        headers={"content-type": "application/json", **(headers or {})})


def _check(request: web.Request, body: Any) -> web.Response | None:
    """The checks the real API makes that a translation could get wrong."""
    if not request.headers.get("x-api-key"):
        return _error(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return _error(400, "anthropic-version: header is required")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    for key in ("model", "messages", "max_tokens"):
        if key not in body:
            return _error(400, f"{key}: Field required")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return _error(400, "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if budget >= body["max_tokens"]:
            return _error(400, "`max_tokens` must be greater than `thinking.budget_tokens`")
    prev_tools: set[str] = set()
    for i, m in enumerate(body["messages"]):
        if m.get("role") not in ("user", "assistant"):
            return _error(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        blocks = m["content"] if isinstance(m["content"], list) else []
        if not isinstance(m["content"], list | str) or m["content"] == []:
            return _error(400, f"messages.{i}: all messages must have non-empty content")
        for b in blocks:
            if b.get("type") == "tool_result" and b.get("tool_use_id") not in prev_tools:
                return _error(400, f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks")
        prev_tools = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return None


def _usage(output: int, cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": output}


def _cache_marks(value: Any) -> int:
    """How many cache_control markers a request holds anywhere."""
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(_cache_marks(v) for v in value.values())
    if isinstance(value, list):
        return sum(_cache_marks(v) for v in value)
    return 0


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if not tools or (body.get("tool_choice") or {}).get("type") == "none":
        return None
    last = body["messages"][-1]["content"]
    if isinstance(last, list) and any(b.get("type") == "tool_result" for b in last):
        return None
    return str(tools[0]["name"])


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    state.seen.append(Seen(request.method, request.path, dict(request.query), dict(request.headers), body))
    fault = state.next_fault() or {}
    if "hang" in fault:
        await asyncio.sleep(fault["hang"])
    if fault.get("reset"):
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)
    if "status" in fault:
        extra = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else {}
        return _error(fault["status"], fault.get("message", "scripted"), extra)
    if fault.get("malformed"):
        return web.Response(status=200, body=b"<html>oops", content_type="text/html")
    if (bad := _check(request, body)) is not None:
        return bad

    model = body["model"]
    tool = _wants_tool(body)
    words = [w if i == 0 else " " + w for i, w in enumerate(state.reply.split(" "))]
    if tool:
        blocks: list[dict[str, Any]] = [
            {"type": "text", "text": TOOL_PREAMBLE},
            {"type": "tool_use", "id": "toolu_up1", "name": tool, "input": {"city": "Paris"}},
        ]
        stop, out_tokens = "tool_use", 9
    else:
        blocks, stop, out_tokens = [{"type": "text", "text": state.reply}], "end_turn", len(words)
    if (body.get("thinking") or {}).get("type") == "enabled":
        blocks.insert(0, {"type": "thinking", "thinking": THINKING, "signature": "sig_up1"})
    # A prompt with cache breakpoints reads CACHED_TOKENS from the cache, as a warm one would.
    cached = CACHED_TOKENS if _cache_marks(body) else 0
    message = {"id": "msg_upstream1", "type": "message", "role": "assistant", "model": model,
               "content": blocks, "stop_reason": stop, "stop_sequence": None,
               "usage": _usage(out_tokens, cached)}
    if not body.get("stream"):
        return web.Response(body=orjson.dumps(message), content_type="application/json")

    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": {**message, "content": [], "stop_reason": None, "usage": _usage(1, cached)}}),
    ]
    for i, b in enumerate(blocks):
        if b["type"] == "thinking":
            events.append(("content_block_start", {"index": i, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}}))
            events.append(("content_block_delta", {"index": i, "delta": {"type": "thinking_delta",
                                                                         "thinking": THINKING}}))
            events.append(("content_block_delta", {"index": i, "delta": {"type": "signature_delta",
                                                                         "signature": "sig_up1"}}))
        elif b["type"] == "text":
            events.append(("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}))
            if i == 0 or blocks[0]["type"] == "thinking":
                events.append(("ping", {}))
            pieces = words if not tool else [b["text"]]
            events.extend(("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": w}})
                          for w in pieces)
        else:
            events.append(("content_block_start", {"index": i, "content_block": {**b, "input": {}}}))
            events.extend(("content_block_delta", {"index": i, "delta": {"type": "input_json_delta",
                                                                         "partial_json": f}})
                          for f in ("", *TOOL_INPUT_FRAGMENTS))
        events.append(("content_block_stop", {"index": i}))
    events.append(("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": out_tokens}}))
    events.append(("message_stop", {}))

    resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                       "cache-control": "no-cache"})
    await resp.prepare(request)
    for n, (name, data) in enumerate(events):
        if fault.get("truncate_stream_after") == n:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if fault.get("error_event_after") == n:
            payload = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            await resp.write(b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n")
            await resp.write_eof()
            return resp
        if fault.get("chunk_delay"):
            await asyncio.sleep(fault["chunk_delay"])
        await resp.write(f"event: {name}\n".encode() + b"data: " + orjson.dumps({"type": name, **data}) + b"\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.StreamResponse:
    """Anthropic's model list (what health probes and ``config validate --probe`` ask for)."""
    request.app[STATE].seen.append(Seen("GET", request.path, {}, dict(request.headers), None))
    return web.json_response({"data": [{"type": "model", "id": "claude-up", "display_name": "Claude",
                                        "created_at": "2025-01-01T00:00:00Z"}],
                              "has_more": False, "first_id": "claude-up", "last_id": "claude-up"})


def make_app(state: UpstreamState | None = None) -> web.Application:
    app = web.Application()
    app[STATE] = state or UpstreamState()
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    return app
