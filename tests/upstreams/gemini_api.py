"""An upstream that speaks Google's Gemini API (generativelanguage v1beta).

``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``
(``data: {...}\\r\\n\\r\\n`` events, as Google frames them, each a whole
``GenerateContentResponse``; the last carries ``finishReason`` and the final
``usageMetadata``) and ``:batchEmbedContents``. The API key travels in
``x-goog-api-key``. Like Google's front end it rejects what it does not know:
an unknown field anywhere in the request, a role other than ``user``/``model``,
a JSON Schema keyword its ``Schema`` lacks, a bad key (400 ``API_KEY_INVALID``).
Errors use Google's body: ``{"error": {"code", "message", "status", "details"}}``.

Replies: with tools declared and the last turn not a function response, the
model calls the first declared function with ``{"city": "Paris"}``; otherwise
it says ``state.reply`` (wrapped as ``{"reply": ...}`` in JSON mode).

``state.faults`` scripts misbehaviour:

    {"status": 500}                      an error status with Google's error body
    {"status": 429, "retry_delay": "7s"} RESOURCE_EXHAUSTED with a RetryInfo detail
    {"hang": 5}                          sleep before answering
    {"reset": True}                      close the connection without a response
    {"truncate_stream_after": 2}         stream N events, then cut the connection
    {"stream_error_after": 2}            stream N events, then an in-stream error object
    {"malformed": True}                  a 200 whose body is not JSON
    {"finish_reason": "SAFETY"}          end the candidate with this finishReason
    {"block_prompt": "SAFETY"}           no candidates, promptFeedback.blockReason
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .server import Seen, UpstreamState

STATE = web.AppKey("state", UpstreamState)
API_KEY = web.AppKey("api_key", str)

MODEL_VERSION_SUFFIX = "-001"
PROMPT_TOKENS = 11

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

_REQUEST_KEYS = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                 "safetySettings", "cachedContent"}
_CONTENT_KEYS = {"role", "parts"}
_PART_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought",
              "thoughtSignature", "executableCode", "codeExecutionResult", "videoMetadata"}
_GENERATION_KEYS = {"stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
                    "candidateCount", "maxOutputTokens", "temperature", "topP", "topK", "seed",
                    "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
                    "thinkingConfig", "responseModalities"}
_SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "enum", "items", "properties",
                "required", "minItems", "maxItems", "minProperties", "maxProperties", "minLength",
                "maxLength", "pattern", "minimum", "maximum", "anyOf", "propertyOrdering", "default",
                "example"}
_SCHEMA_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "TYPE_UNSPECIFIED"}


class Invalid(Exception):
    pass


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    err: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if details:
        err["details"] = details
    return orjson.dumps({"error": err})


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, details),
                        content_type="application/json")


def _unknown(obj: Any, allowed: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise Invalid(f"Invalid value at '{where}': expected an object")
    for k in obj:
        if k not in allowed:
            raise Invalid(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': '
                          "Cannot find field.")


def _check_schema(schema: Any, where: str) -> None:
    _unknown(schema, _SCHEMA_KEYS, where)
    if "type" in schema and str(schema["type"]).upper() not in _SCHEMA_TYPES:
        raise Invalid(f"Invalid value at '{where}.type': {schema['type']!r}")
    for name, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{where}.properties[{name}].value")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items")
    for i, sub in enumerate(schema.get("anyOf") or []):
        _check_schema(sub, f"{where}.any_of[{i}]")
    if str(schema.get("type", "")).upper() == "OBJECT" and "properties" in schema and not schema["properties"]:
        raise Invalid(f"{where}.properties: should be non-empty for OBJECT type")


def check_generate(body: Any) -> None:
    """Reject, as Google does, a request that is not a well-formed GenerateContentRequest."""
    _unknown(body, _REQUEST_KEYS, "")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise Invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, c in enumerate(contents):
        _unknown(c, _CONTENT_KEYS, f"contents[{i}]")
        if c.get("role") not in ("user", "model"):
            raise Invalid(f"Please use a valid role: user, model. (contents[{i}])")
        if not c.get("parts"):
            raise Invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
        for j, p in enumerate(c["parts"]):
            _unknown(p, _PART_KEYS, f"contents[{i}].parts[{j}]")
            if "inlineData" in p:
                _unknown(p["inlineData"], {"mimeType", "data"}, f"contents[{i}].parts[{j}].inline_data")
            if "functionCall" in p:
                _unknown(p["functionCall"], {"id", "name", "args"}, f"contents[{i}].parts[{j}].function_call")
            if "functionResponse" in p:
                fr = p["functionResponse"]
                _unknown(fr, {"id", "name", "response"}, f"contents[{i}].parts[{j}].function_response")
                if not isinstance(fr.get("response"), dict):
                    raise Invalid(f"contents[{i}].parts[{j}].function_response.response must be an object")
    if "systemInstruction" in body:
        _unknown(body["systemInstruction"], _CONTENT_KEYS, "system_instruction")
    for i, tool in enumerate(body.get("tools") or []):
        _unknown(tool, {"functionDeclarations", "googleSearch", "codeExecution"}, f"tools[{i}]")
        for j, decl in enumerate(tool.get("functionDeclarations") or []):
            where = f"tools[{i}].function_declarations[{j}]"
            _unknown(decl, {"name", "description", "parameters", "parametersJsonSchema", "response"}, where)
            if "parameters" in decl:
                _check_schema(decl["parameters"], where + ".parameters")
    if "toolConfig" in body:
        _unknown(body["toolConfig"], {"functionCallingConfig"}, "tool_config")
        _unknown(body["toolConfig"]["functionCallingConfig"], {"mode", "allowedFunctionNames"},
                 "tool_config.function_calling_config")
    gen = body.get("generationConfig")
    if gen is not None:
        _unknown(gen, _GENERATION_KEYS, "generation_config")
        if "responseSchema" in gen:
            _check_schema(gen["responseSchema"], "generation_config.response_schema")


async def _apply_fault(request: web.Request, fault: dict[str, Any]) -> web.StreamResponse | None:
    """The response a fault stands for, or None when it only shapes the normal answer."""
    if not fault:
        return None
    if "hang" in fault:
        await asyncio.sleep(fault["hang"])
    if fault.get("reset"):
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)
    if "status" in fault:
        details = None
        if "retry_delay" in fault:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": fault["retry_delay"]}]
        return _error(fault["status"], fault.get("message", "scripted"), details)
    if fault.get("malformed"):
        return web.Response(status=200, body=b"<html>oops", content_type="text/html")
    return None


def _reply_parts(body: dict[str, Any], state: UpstreamState) -> list[dict[str, Any]]:
    decls = [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode", "AUTO")
    last = body["contents"][-1]["parts"]
    answered = any("functionResponse" in p for p in last)
    if decls and mode != "NONE" and not answered:
        return [{"functionCall": {"name": decls[0]["name"], "args": {"city": "Paris"}}}]
    text = state.reply
    if (body.get("generationConfig") or {}).get("responseMimeType") == "application/json":
        text = orjson.dumps({"reply": text}).decode()
    return [{"text": text}]


def _usage(candidates: int | None) -> dict[str, int]:
    meta = {"promptTokenCount": PROMPT_TOKENS, "totalTokenCount": PROMPT_TOKENS}
    if candidates is not None:
        meta["candidatesTokenCount"] = candidates
        meta["totalTokenCount"] = PROMPT_TOKENS + candidates
    return meta


async def generate(
    request: web.Request, model: str, body: dict[str, Any], *, stream: bool, fault: dict[str, Any]
) -> web.StreamResponse:
    state = request.app[STATE]
    version = model + MODEL_VERSION_SUFFIX
    events: list[dict[str, Any]]
    if "block_prompt" in fault:
        blocked = {"promptFeedback": {"blockReason": fault["block_prompt"]}, "usageMetadata": _usage(None),
                   "modelVersion": version, "responseId": "resp-blocked"}
        if not stream:
            return web.json_response(blocked, dumps=lambda o: orjson.dumps(o).decode())
        events = [blocked]
    else:
        parts = _reply_parts(body, state)
        finish = fault.get("finish_reason", "STOP")
        if not stream:
            n = len(parts[0]["text"].split(" ")) if "text" in parts[0] else 5
            return web.json_response({
                "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish,
                                "index": 0, "safetyRatings": []}],
                "usageMetadata": _usage(n), "modelVersion": version, "responseId": "resp-upstream1",
            }, dumps=lambda o: orjson.dumps(o).decode())
        events = []
        if "text" in parts[0]:
            words = parts[0]["text"].split(" ")
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            for i, piece in enumerate(pieces):
                cand: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
                last = i == len(pieces) - 1
                if last:
                    cand["finishReason"] = finish
                events.append({"candidates": [cand], "usageMetadata": _usage(len(words) if last else None),
                               "modelVersion": version, "responseId": "resp-upstream1"})
        else:
            events.append({"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish,
                                           "index": 0}],
                           "usageMetadata": _usage(5), "modelVersion": version, "responseId": "resp-upstream1"})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                       "content-disposition": "attachment"})
    await resp.prepare(request)
    cut = fault.get("truncate_stream_after")
    fail = fault.get("stream_error_after")
    for i, ev in enumerate(events):
        if cut is not None and i == cut:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if fail is not None and i == fail:
            await resp.write(b"data: " + error_body(500, "An internal error has occurred.") + b"\r\n\r\n")
            await resp.write_eof()
            return resp
        if fault.get("chunk_delay"):
            await asyncio.sleep(fault["chunk_delay"])
        await resp.write(b"data: " + orjson.dumps(ev) + b"\r\n\r\n")
    await resp.write_eof()
    return resp


async def batch_embed(model: str, body: dict[str, Any]) -> web.StreamResponse:
    _unknown(body, {"requests"}, "")
    out = []
    for i, req in enumerate(body.get("requests") or []):
        _unknown(req, {"model", "content", "taskType", "title", "outputDimensionality"}, f"requests[{i}]")
        if req.get("model") != "models/" + model:
            raise Invalid(f"Model names should match: requests[{i}].model is {req.get('model')!r}, "
                          f"expected 'models/{model}'")
        dims = int(req.get("outputDimensionality") or 3)
        values = [0.1 * (i + 1), 0.2, 0.3] + [0.5] * (dims - 3)
        out.append({"values": values[:dims]})
    return web.json_response({"embeddings": out})


async def model_method(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = None
    state.seen.append(Seen(request.method, request.path, dict(request.query), dict(request.headers), body))
    model, _, method = request.match_info["target"].partition(":")
    key = request.headers.get("x-goog-api-key")
    if key is None:
        return _error(403, "Method doesn't allow unregistered callers (callers without established identity). "
                           "Please use API Key or other form of API consumer identity to call this API.")
    if key != request.app[API_KEY]:
        return _error(400, "API key not valid. Please pass a valid API key.", [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com"}])
    if body is None:
        return _error(400, "Invalid JSON payload received.")
    fault = state.next_fault() or {}
    if (r := await _apply_fault(request, fault)) is not None:
        return r
    try:
        if method == "generateContent":
            check_generate(body)
            return await generate(request, model, body, stream=False, fault=fault)
        if method == "streamGenerateContent":
            check_generate(body)
            if request.query.get("alt") != "sse":
                return _error(400, "this upstream only streams with alt=sse")
            return await generate(request, model, body, stream=True, fault=fault)
        if method == "batchEmbedContents":
            return await batch_embed(model, body)
    except Invalid as exc:
        return _error(400, str(exc))
    return _error(404, f"method {method!r} not found for models/{model}")


def make_app(state: UpstreamState | None = None, *, api_key: str = "gm-upstream-secret") -> web.Application:
    app = web.Application()
    app[STATE] = state or UpstreamState()
    app[API_KEY] = api_key
    app.router.add_post("/v1beta/models/{target}", model_method)
    return app
