"""An upstream that speaks the OpenAI API: chat, completions, embeddings, models.

Responses and SSE chunks follow OpenAI's documented shapes byte for byte in
structure (``data: {...}\\n\\n`` events, a final usage chunk with empty
``choices`` when ``stream_options.include_usage`` is set, then ``data: [DONE]``).
Errors use OpenAI's error body. ``state.faults`` scripts misbehaviour:

    {"status": 500}                      an error status with OpenAI's error body
    {"status": 429, "retry_after": 2}    rate limited, with Retry-After
    {"status": 401, "message": "..."}    an error whose message says something in particular
    {"hang": 5}                          sleep before answering
    {"hold": 10}                         wait until the test sets ``state.release`` (at most 10 s)
    {"reset": True}                      close the connection without a response
    {"truncate_stream_after": 2}         stream N chunks, then cut the connection
    {"malformed": True}                  a 200 whose body is not JSON
    {"truncate_body": True}              a 200 JSON body cut short (Content-Length promises more)
    {"malformed_stream": True}           a 200 event stream whose events are not JSON
    {"chunk_delay": 1, "chunk_delay_from": 1}   sleep before each stream event from the Nth on
    {"pause_after": 2}                   stream N events, then wait for ``state.release`` (at most 15 s)

``state.always`` (a fault dict) applies to every request once ``faults`` is empty.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

from .server import Seen, UpstreamState

STATE = web.AppKey("state", UpstreamState)
FAULT = web.RequestKey("fault", dict)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def error_body(status: int, message: str) -> bytes:
    kinds = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_exceeded"}
    return orjson.dumps({"error": {"message": message, "type": kinds.get(status, "server_error"),
                                   "param": None, "code": None}})


async def _apply_fault(request: web.Request, state: UpstreamState) -> web.StreamResponse | None:
    fault = state.next_fault()
    if fault is None:
        return None
    if "hold" in fault:
        # A test that must line requests up behind this one releases it when they are in
        # place, rather than racing a fixed hang on a loaded machine.
        loop = asyncio.get_running_loop()
        end = loop.time() + fault["hold"]
        while not state.release.is_set() and loop.time() < end:
            await asyncio.sleep(0.02)
    if "hang" in fault:
        # Sleep in slices so a gateway that hangs up is noticed and counted.
        loop = asyncio.get_running_loop()
        end = loop.time() + fault["hang"]
        while loop.time() < end:
            if request.transport is None or request.transport.is_closing():
                state.disconnects += 1
                return web.Response(status=499)
            await asyncio.sleep(0.02)
    if fault.get("reset"):
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)
    if "status" in fault:
        headers = {"content-type": "application/json"}
        if "retry_after" in fault:
            headers["retry-after"] = str(fault["retry_after"])
        return web.Response(status=fault["status"], body=error_body(fault["status"], fault.get("message", "scripted")),
                            headers=headers)
    if fault.get("malformed"):
        return web.Response(status=200, body=b"<html>oops", content_type="text/html")
    if fault.get("truncate_body"):
        resp = web.StreamResponse(status=200, headers={"content-type": "application/json",
                                                       "content-length": "400"})
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-cut", "object": "chat.comp')
        assert request.transport is not None
        request.transport.abort()
        return resp
    if fault.get("malformed_stream"):
        resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: <html>this is not json</html>\n\n")
        await resp.write_eof()
        return resp
    request[FAULT] = fault
    return None


async def _record(request: web.Request) -> tuple[UpstreamState, dict[str, Any]]:
    state = request.app[STATE]
    body = orjson.loads(await request.read()) if request.can_read_body else {}
    state.seen.append(Seen(request.method, request.path, dict(request.query),
                           dict(request.headers), body))
    return state, body


async def chat(request: web.Request) -> web.StreamResponse:
    state, body = await _record(request)
    if (r := await _apply_fault(request, state)) is not None:
        return r
    model = body["model"]
    words = [w if i == 0 else " " + w for i, w in enumerate(state.reply.split(" "))]
    p = 10
    cid, created = "chatcmpl-upstream1", int(time.time())
    tools = body.get("tools")
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": state.reply, "refusal": None}
        finish = "stop"
        if tools:
            name = tools[0]["function"]["name"]
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "call_up1", "type": "function",
                 "function": {"name": name, "arguments": '{"city": "Paris"}'}}]}
            finish = "tool_calls"
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(p, len(words)), "system_fingerprint": "fp_test",
        }, dumps=lambda o: orjson.dumps(o).decode())
    resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_test"}

    async def send(obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    fault = request.get(FAULT) or {}
    cut = fault.get("truncate_stream_after")
    def events() -> Iterator[dict[str, Any]]:
        # Built as they are sent: a long reply must not delay the first byte (a slow CI
        # machine took over a second to build 100,000 chunks up front, tripping first_byte).
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        if tools:
            name = tools[0]["function"]["name"]
            yield chunk({"tool_calls": [{"index": 0, "id": "call_up1", "type": "function",
                                         "function": {"name": name, "arguments": ""}}]})
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
            yield chunk({}, "tool_calls")
        else:
            yield from (chunk({"content": w}) for w in words)
            yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {**base, "choices": [], "usage": _usage(p, len(words))}

    for i, ev in enumerate(events()):
        if cut is not None and i == cut:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if fault.get("chunk_delay") and i >= fault.get("chunk_delay_from", 0):
            await asyncio.sleep(fault["chunk_delay"])
        if "pause_after" in fault and i == fault["pause_after"]:
            # Mid-stream, until the test has done what must happen while the stream is open.
            end = asyncio.get_running_loop().time() + 15
            while not state.release.is_set() and asyncio.get_running_loop().time() < end:
                await asyncio.sleep(0.02)
        try:
            await send(ev)
        except ConnectionResetError:
            state.disconnects += 1
            return resp
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    state, body = await _record(request)
    if (r := await _apply_fault(request, state)) is not None:
        return r
    text = state.reply
    base = {"id": "cmpl-upstream1", "object": "text_completion", "created": int(time.time()),
            "model": body["model"]}
    if not body.get("stream"):
        return web.json_response({**base, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(5, 3)})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for w in text.split(" "):
        await resp.write(b"data: " + orjson.dumps({**base, "choices": [
            {"index": 0, "text": w + " ", "logprobs": None, "finish_reason": None}]}) + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": _usage(5, 3)})
                         + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.StreamResponse:
    state, body = await _record(request)
    if (r := await _apply_fault(request, state)) is not None:
        return r
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for i, _ in enumerate(inputs):
        vec = [0.1 * (i + 1), 0.2, 0.3]
        emb: Any = vec
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack("<3f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return web.json_response({"object": "list", "data": data, "model": body["model"],
                              "usage": {"prompt_tokens": 4, "total_tokens": 4}})


async def models(request: web.Request) -> web.StreamResponse:
    request.app[STATE].seen.append(Seen("GET", request.path, {}, dict(request.headers), None))
    return web.json_response({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"}]})


def make_app(state: UpstreamState | None = None, *, prefix: str = "/v1") -> web.Application:
    app = web.Application()
    app[STATE] = state or UpstreamState()
    app.router.add_post(prefix + "/chat/completions", chat)
    app.router.add_post(prefix + "/completions", completions)
    app.router.add_post(prefix + "/embeddings", embeddings)
    app.router.add_get(prefix + "/models", models)
    return app


def _azure(handler: Handler) -> Handler:
    """Azure's front: no api-version is a 404 before the deployment is even looked at."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if "api-version" not in request.query:
            await _record(request)
            return web.json_response({"error": {
                "code": "404", "message": "Resource not found"}}, status=404)
        return await handler(request)

    return wrapped


def make_azure_app(state: UpstreamState | None = None) -> web.Application:
    """The same API as Azure OpenAI serves it: per-deployment paths, ``?api-version=``.

    The handlers and their fault scripting are the OpenAI ones; the deployment
    and the api-version are visible in ``state.seen`` (``path``, ``query``).
    """
    app = web.Application()
    app[STATE] = state or UpstreamState()
    base = "/openai/deployments/{deployment}"
    app.router.add_post(base + "/chat/completions", _azure(chat))
    app.router.add_post(base + "/completions", _azure(completions))
    app.router.add_post(base + "/embeddings", _azure(embeddings))
    return app
