"""Google's Gemini API (generativelanguage.googleapis.com), behind OpenAI chat and embeddings.

Theory of operation: the adapter takes ``chat`` and ``embeddings`` in OpenAI's
wire format and converts inside ``send``; the gateway's own translations bring
``completions`` and ``messages`` to ``chat`` first. The conversions are pure
functions of dicts (``chat_request``, ``chat_response``, ``embed_request``,
``embed_response``) plus one stateful, I/O-free ``ChatStream`` that turns each
streamed ``GenerateContentResponse`` into OpenAI ``chat.completion.chunk``s.

Rules of the mapping:

- system (and developer) messages become ``systemInstruction``; user and
  assistant become ``contents`` with role ``user``/``model``; adjacent turns of
  one role merge, since Gemini wants the roles to alternate;
- assistant ``tool_calls`` become ``functionCall`` parts; ``tool`` messages
  become ``functionResponse`` parts named after the call they answer (Gemini
  matches responses by name and order, not by id);
- images travel inline only (``data:`` URLs); Gemini cannot fetch arbitrary URLs;
- Gemini's ``finishReason`` becomes OpenAI's ``finish_reason``; a turn that
  produced function calls finishes with ``tool_calls``;
- ``reasoning_effort`` becomes ``thinkingConfig.thinkingBudget`` (the table in
  ``hapax._translate_fields``); thinking tokens count as output: Google bills
  them so;
- every top-level field is in ``CHAT_FIELDS`` or refused with a 400 naming it
  (``check_body``, which the dispatcher runs before any attempt).

Errors keep Google's body; ``error_from_status`` reads two things only Google
sends: a bad API key is a 400 (``API_KEY_INVALID``), which is the gateway's
credential and not the caller's fault, and a 429 carries its back-off in
``RetryInfo.retryDelay`` instead of a ``Retry-After`` header.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from .._errors import InvalidField, UpstreamError, UpstreamUnavailable
from .._sse import SSEEvent
from .._translate_fields import CHAT_NEUTRAL, reasoning_budget, refuse_unknown
from .._usage import Usage, estimate_prompt_tokens, text_of
from ._base import Call, EventBatches, JsonReply, Operation, Provider, Reply, StreamReply

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
#: v1beta, not v1: systemInstruction, tools and JSON mode are only complete there.
API_VERSION = "v1beta"

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

#: The OpenAPI-subset keys Gemini's ``Schema`` accepts; it rejects the whole
#: request on any other JSON Schema keyword (``additionalProperties``, ``$schema``...).
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "properties",
    "required", "minItems", "maxItems", "minProperties", "maxProperties", "minLength",
    "maxLength", "pattern", "minimum", "maximum", "anyOf", "propertyOrdering", "default",
    "example",
})
#: String/number formats Gemini knows; any other (``email``, ``uri``) is dropped.
_SCHEMA_FORMATS = frozenset({"enum", "date-time", "int32", "int64", "float", "double"})

_TOOL_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}


# -- request ---------------------------------------------------------------------------------


#: OpenAI chat fields ``chat_request`` carries. Accepted without effect, because they do not
#: change the answer and Gemini has no field for them: ``user``/``safety_identifier`` (abuse
#: monitoring ids), ``metadata`` (tags for OpenAI's stored completions), ``prompt_cache_key``.
CHAT_FIELDS = frozenset({
    "model", "messages", "tools", "tool_choice", "temperature", "top_p", "top_k", "n",
    "presence_penalty", "frequency_penalty", "seed", "max_tokens", "max_completion_tokens", "stop",
    "response_format", "stream", "stream_options", "reasoning_effort", "user", "safety_identifier",
    "metadata", "prompt_cache_key",
})
_CHAT_NEUTRAL = {k: v for k, v in CHAT_NEUTRAL.items() if k not in CHAT_FIELDS}
EMBED_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def check_body(op: Operation, body: dict[str, Any]) -> None:
    """Refuse a field Gemini cannot carry, before any slot or attempt is spent on it."""
    if op is Operation.CHAT:
        refuse_unknown(body, CHAT_FIELDS, _CHAT_NEUTRAL, "Gemini")
    elif op is Operation.EMBEDDINGS:
        refuse_unknown(body, EMBED_FIELDS, {}, "Gemini")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat body as a Gemini ``GenerateContentRequest``.

    ``cache_control`` markers on parts or messages are accepted and not sent:
    Gemini caches repeated prompt prefixes implicitly (and explicit caches are
    ``cachedContents`` resources, not request fields); what it cached comes
    back as ``cached_tokens`` in usage.
    """
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names_by_call_id: dict[str, str] = {}
    for i, m in enumerate(body.get("messages") or []):
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend({"text": t} for t in _texts(m.get("content")))
        elif role == "user":
            _append(contents, "user", _user_parts(m.get("content"), i))
        elif role == "assistant":
            parts: list[dict[str, Any]] = [{"text": t} for t in _texts(m.get("content")) if t]
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidField(
                        f"messages[{i}].tool_calls needs function.name", param=f"messages[{i}].tool_calls"
                    )
                if isinstance(tc.get("id"), str):
                    names_by_call_id[tc["id"]] = fn["name"]
                parts.append({"functionCall": {"name": fn["name"], "args": _args(fn.get("arguments"), i)}})
            if parts:
                _append(contents, "model", parts)
        elif role == "tool":
            name = names_by_call_id.get(str(m.get("tool_call_id")))
            if name is None:
                raise InvalidField(
                    f"messages[{i}].tool_call_id does not answer an earlier assistant tool call",
                    param=f"messages[{i}].tool_call_id",
                )
            _append(contents, "user", [_function_response(name, m.get("content"))])
        elif role == "function":  # the deprecated single-function form
            _append(contents, "user", [_function_response(str(m.get("name")), m.get("content"))])
        else:
            raise InvalidField(f"messages[{i}].role {role!r} is not supported", param=f"messages[{i}].role")

    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = [{"functionDeclarations": tools}]
        config = _tool_config(body.get("tool_choice"))
        if config:
            out["toolConfig"] = {"functionCallingConfig": config}
    gen = _generation_config(body)
    if gen:
        out["generationConfig"] = gen
    return out


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("text", "refusal"):
                t = p.get("text", p.get("refusal"))
                if isinstance(t, str):
                    out.append(t)
        return out
    return []


def _user_parts(content: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise InvalidField(f"messages[{i}].content must be a string or an array", param=f"messages[{i}].content")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            parts.append({"text": str(p.get("text", ""))})
        elif kind == "image_url":
            ref = p.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            parts.append({"inlineData": _data_url(url, where)})
        elif kind == "input_audio":
            audio = p.get("input_audio") or {}
            parts.append({"inlineData": {
                "mimeType": f"audio/{audio.get('format', 'wav')}", "data": str(audio.get("data", "")),
            }})
        elif kind == "file":
            f = p.get("file") or {}
            parts.append({"inlineData": _data_url(f.get("file_data"), where)})
        else:
            raise InvalidField(f"{where}: content type {kind!r} is not supported by Gemini", param=where)
    return parts


def _data_url(url: Any, where: str) -> dict[str, str]:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InvalidField(f"{where}: Gemini deployments take inline data: URLs only", param=where)
    head, sep, data = url[5:].partition(",")
    mime, _, encoding = head.partition(";")
    if not sep or encoding != "base64" or not mime:
        raise InvalidField(f"{where}: expected data:<mime type>;base64,<data>", param=where)
    return {"mimeType": mime, "data": data}


def _args(arguments: Any, i: int) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        raise InvalidField(
            f"messages[{i}].tool_calls: arguments must be a JSON object", param=f"messages[{i}].tool_calls"
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidField(
            f"messages[{i}].tool_calls: arguments must be a JSON object", param=f"messages[{i}].tool_calls"
        )
    return parsed


def _function_response(name: str, content: Any) -> dict[str, Any]:
    text = text_of(content)
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    # Gemini wants an object; Google's convention names a bare result "output".
    response = value if isinstance(value, dict) else {"output": value}
    return {"functionResponse": {"name": name, "response": response}}


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidField(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
        decl: dict[str, Any] = {"name": fn["name"]}
        if isinstance(fn.get("description"), str):
            decl["description"] = fn["description"]
        params = fn.get("parameters")
        # Gemini rejects an OBJECT schema without properties: a no-argument tool omits it.
        if isinstance(params, dict) and params.get("properties"):
            decl["parameters"] = gemini_schema(params)
        out.append(decl)
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"mode": _TOOL_MODES[choice]}
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"mode": "ANY", "allowedFunctionNames": [fn["name"]]}
    if choice is None:
        return None
    raise InvalidField("'tool_choice' must be auto, none, required or a function", param="tool_choice")


def gemini_schema(schema: Any) -> Any:
    """A JSON Schema cut down to the subset Gemini's ``Schema`` accepts."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "const" and "enum" not in schema:
            out["enum"] = [value]
        elif key not in _SCHEMA_KEYS:
            continue
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            real = [t for t in types if t != "null"]
            if len(real) < len(types):
                out["nullable"] = True
            if real:
                out["type"] = str(real[0]).upper()
        elif key == "format":
            if value in _SCHEMA_FORMATS:
                out["format"] = value
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: gemini_schema(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = gemini_schema(value)
        elif key == "anyOf" and isinstance(value, list):
            out["anyOf"] = [gemini_schema(v) for v in value]
        else:
            out[key] = value
    return out


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    for src, dst in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ):
        if body.get(src) is not None:
            gen[dst] = body[src]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        gen["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        gen["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        gen["stopSequences"] = stop
    if body.get("top_k") is not None:
        gen["topK"] = body["top_k"]
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        gen["responseMimeType"] = "application/json"
        js = rf.get("json_schema")
        if rf["type"] == "json_schema" and isinstance(js, dict) and isinstance(js.get("schema"), dict):
            gen["responseSchema"] = gemini_schema(js["schema"])
    elif rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise InvalidField("'response_format.type' must be text, json_object or json_schema",
                           param="response_format")
    effort = body.get("reasoning_effort")
    if effort is not None:
        budget = reasoning_budget(effort)
        # 0 turns thinking off, on the models that allow it (the others refuse, loudly).
        gen["thinkingConfig"] = {"thinkingBudget": 0 if budget is None else budget}
    return gen


# -- response --------------------------------------------------------------------------------


def take_usage(usage: Usage, meta: Any) -> None:
    """Fill ``usage`` from a ``usageMetadata``; streams repeat it cumulatively, so last wins."""
    if not isinstance(meta, dict):
        return
    usage.prompt_tokens = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    usage.completion_tokens = int(meta.get("candidatesTokenCount") or 0) + int(meta.get("thoughtsTokenCount") or 0)
    usage.cached_tokens = int(meta.get("cachedContentTokenCount") or 0)
    usage.reported = True


def finish_reason(reason: Any, *, tool_calls: bool) -> str:
    mapped = _FINISH.get(str(reason), "stop")
    return "tool_calls" if tool_calls and mapped == "stop" else mapped


def _split_parts(parts: Any) -> tuple[str, list[dict[str, Any]]]:
    """The visible text and the function calls among a candidate's parts."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for p in parts if isinstance(parts, list) else []:
        if not isinstance(p, dict) or p.get("thought"):
            continue  # thought summaries are only sent when asked for; never shown as content
        if isinstance(p.get("text"), str):
            text.append(p["text"])
        elif isinstance(p.get("functionCall"), dict):
            calls.append(p["functionCall"])
    return "".join(text), calls


def _tool_call(fc: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {
        "id": fc["id"] if isinstance(fc.get("id"), str) and fc["id"] else call_id,
        "type": "function",
        "function": {"name": str(fc.get("name", "")), "arguments": orjson.dumps(fc.get("args") or {}).decode()},
    }


def chat_response(
    data: dict[str, Any], *, model: str, response_id: str, created: int, usage: Usage
) -> dict[str, Any]:
    """A ``GenerateContentResponse`` as an OpenAI ``chat.completion``.

    ``response_id`` seeds the completion id and the ids of tool calls Gemini
    left unnamed.
    """
    choices = []
    for n, cand in enumerate(data.get("candidates") or []):
        idx = int(cand.get("index", n))
        content = cand.get("content") if isinstance(cand.get("content"), dict) else {}
        text, calls = _split_parts(content.get("parts"))
        msg: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if calls:
            msg["tool_calls"] = [_tool_call(fc, f"call_{response_id}_{idx}_{k}") for k, fc in enumerate(calls)]
        elif not text:
            msg["content"] = ""
        choices.append({
            "index": idx,
            "message": msg,
            "logprobs": None,
            "finish_reason": finish_reason(cand.get("finishReason"), tool_calls=bool(calls)),
        })
    if not choices:
        # The prompt itself was blocked (promptFeedback.blockReason): nothing was generated.
        choices.append({
            "index": 0,
            "message": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": "content_filter",
        })
    return {
        "id": "chatcmpl-" + response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.openai(),
    }


class ChatStream:
    """Streamed ``GenerateContentResponse``s in, ``chat.completion.chunk`` dicts out.

    Gemini sends whole function calls in one chunk, so each becomes a single
    tool-call delta carrying its complete arguments. ``usage`` is updated from
    every chunk's ``usageMetadata``.
    """

    def __init__(
        self, *, model: str, response_id: str, created: int, usage: Usage, include_usage: bool
    ) -> None:
        self.usage = usage
        self._include_usage = include_usage
        self._id = response_id
        self._base = {
            "id": "chatcmpl-" + response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._calls: dict[int, int] = {}  # candidate index -> tool calls sent so far

    def _chunk(self, idx: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [
            {"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _start(self, idx: int) -> list[dict[str, Any]]:
        if idx in self._started:
            return []
        self._started.add(idx)
        return [self._chunk(idx, {"role": "assistant", "content": "", "refusal": None})]

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        take_usage(self.usage, data.get("usageMetadata"))
        out: list[dict[str, Any]] = []
        candidates = data.get("candidates") or []
        for n, cand in enumerate(candidates):
            idx = int(cand.get("index", n))
            out += self._start(idx)
            content = cand.get("content") if isinstance(cand.get("content"), dict) else {}
            text, calls = _split_parts(content.get("parts"))
            if text:
                out.append(self._chunk(idx, {"content": text}))
            for fc in calls:
                k = self._calls.get(idx, 0)
                self._calls[idx] = k + 1
                out.append(self._chunk(idx, {"tool_calls": [
                    {"index": k, **_tool_call(fc, f"call_{self._id}_{idx}_{k}")}]}))
            if cand.get("finishReason") and idx not in self._finished:
                self._finished.add(idx)
                reason = finish_reason(cand["finishReason"], tool_calls=bool(self._calls.get(idx)))
                out.append(self._chunk(idx, {}, reason))
        feedback = data.get("promptFeedback")
        if not candidates and isinstance(feedback, dict) and feedback.get("blockReason"):
            out += self._start(0)
            if 0 not in self._finished:
                self._finished.add(0)
                out.append(self._chunk(0, {}, "content_filter"))
        return out

    def finish(self) -> list[dict[str, Any]]:
        if not self._started:
            raise UpstreamUnavailable("Gemini ended the stream without a candidate")
        # A clean end with no finishReason still tells the client the choice is done.
        out = [self._chunk(idx, {}, "stop") for idx in sorted(self._started - self._finished)]
        self._finished |= self._started
        if self._include_usage:
            out.append({**self._base, "choices": [], "usage": self.usage.openai()})
        return out


# -- embeddings ------------------------------------------------------------------------------


def embed_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI embeddings body as a ``BatchEmbedContentsRequest``."""
    inp = body.get("input")
    items = inp if isinstance(inp, list) else [inp]
    requests = []
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidField(f"input[{i}]: Gemini embeds text, not token arrays", param="input")
        req: dict[str, Any] = {"model": "models/" + model, "content": {"parts": [{"text": text}]}}
        if isinstance(body.get("dimensions"), int):
            req["outputDimensionality"] = body["dimensions"]
        requests.append(req)
    return {"requests": requests}


def embed_response(data: dict[str, Any], *, model: str, base64_floats: bool, usage: Usage) -> dict[str, Any]:
    out = []
    for i, emb in enumerate(data.get("embeddings") or []):
        values = (emb.get("values") or []) if isinstance(emb, dict) else []
        vec: Any = values
        if base64_floats:
            # What OpenAI sends for encoding_format=base64: little-endian float32.
            vec = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        out.append({"object": "embedding", "index": i, "embedding": vec})
    return {
        "object": "list",
        "data": out,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }


# -- the adapter -----------------------------------------------------------------------------


class GeminiProvider(Provider):
    type = "gemini"
    operations: ClassVar[frozenset[Operation]] = frozenset({Operation.CHAT, Operation.EMBEDDINGS})
    base_url_hint = "a gemini provider's base_url is the host, without a version (https://generativelanguage.googleapis.com)"

    def url(self, model: str, method: str) -> str:
        base = (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")
        name = quote(model.removeprefix("models/"), safe="")
        return f"{base}/{API_VERSION}/models/{name}:{method}"

    def headers(self, call: Call | None = None) -> dict[str, str]:
        h = dict(call.headers) if call is not None else {}
        h["content-type"] = h["accept"] = "application/json"
        if self.config.api_key is not None:
            h["x-goog-api-key"] = self.config.api_key.get_secret_value()
        h.update(self.config.headers)
        return h

    def check(self, op: Operation, body: dict[str, Any]) -> None:
        check_body(op, body)

    async def send(self, call: Call) -> Reply:
        model = str(call.body.get("model", "")).removeprefix("models/")
        if call.op is Operation.EMBEDDINGS:
            return await self._embed(call, model)
        request = chat_request(call.body)
        response_id = os.urandom(12).hex()
        created = int(time.time())
        if not call.stream:
            resp = await self._request(self.url(model, "generateContent"), self.headers(call), request)
            data, _ = await self._read_json(resp)
            usage = Usage()
            take_usage(usage, data.get("usageMetadata"))
            body = chat_response(data, model=model, response_id=response_id, created=created, usage=usage)
            return JsonReply(body=body, usage=usage)
        headers = self.headers(call)
        headers["accept"] = "text/event-stream"
        resp = await self._request(self.url(model, "streamGenerateContent") + "?alt=sse", headers, request)
        opts = call.body.get("stream_options")
        usage = Usage()
        stream = ChatStream(
            model=model, response_id=response_id, created=created, usage=usage,
            include_usage=isinstance(opts, dict) and bool(opts.get("include_usage")),
        )
        return StreamReply(events=self._stream(resp, stream), usage=usage, _close=resp.close)

    async def _stream(self, resp: Any, stream: ChatStream) -> EventBatches:
        async for batch in self._events(resp):
            out: list[SSEEvent] = []
            for ev in batch:
                try:
                    data = ev.json()
                except orjson.JSONDecodeError:
                    raise UpstreamUnavailable(f"provider {self.name} sent a stream event that is not JSON") from None
                if not isinstance(data, dict):
                    raise UpstreamUnavailable(f"provider {self.name} sent a stream event that is not an object")
                err = data.get("error")
                if isinstance(err, dict):
                    if out:
                        yield out  # what came before the error still reaches the client
                    # Google reports a failure after the headers as an error object in the stream.
                    code = err.get("code")
                    raise self.error_from_status(code if isinstance(code, int) else 500, ev.data, None)
                out.extend(SSEEvent(data=orjson.dumps(chunk)) for chunk in stream.feed(data))
            if out:
                yield out
        final = [SSEEvent(data=orjson.dumps(chunk)) for chunk in stream.finish()]
        if final:
            yield final

    async def _embed(self, call: Call, model: str) -> JsonReply:
        request = embed_request(call.body, model)
        resp = await self._request(self.url(model, "batchEmbedContents"), self.headers(call), request)
        data, _ = await self._read_json(resp)
        # batchEmbedContents reports no token counts: the estimate stands in, marked unreported.
        usage = Usage(prompt_tokens=estimate_prompt_tokens(call.body))
        body = embed_response(
            data, model=model, base64_floats=call.body.get("encoding_format") == "base64", usage=usage
        )
        return JsonReply(body=body, usage=usage)

    def error_from_status(self, status: int, raw: bytes, retry_after: str | None) -> UpstreamError:
        details: list[Any] = []
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, list) and data:  # streamGenerateContent without alt=sse wraps it
            data = data[0]
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("details"), list):
            details = [d for d in err["details"] if isinstance(d, dict)]
        if status == 400 and any(d.get("reason") == "API_KEY_INVALID" for d in details):
            status = 401
        if retry_after is None:
            for d in details:
                delay = d.get("retryDelay")
                if str(d.get("@type", "")).endswith("google.rpc.RetryInfo") and isinstance(delay, str):
                    retry_after = delay.removesuffix("s")
        return super().error_from_status(status, raw, retry_after)
