"""Gemini behind the gateway: OpenAI chat and embeddings translated to the Gemini API.

The first half tests the pure translation functions; the second drives a real
gateway process with the official openai SDK against a local upstream speaking
the Gemini API (``tests/upstreams/gemini_api.py``), and checks both what the
client got and what the upstream received.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from hapax._errors import InvalidField, UpstreamUnavailable
from hapax._usage import Usage
from hapax.config._config import ProviderConfig
from hapax.providers._gemini import (
    ChatStream,
    GeminiProvider,
    chat_request,
    chat_response,
    embed_request,
    gemini_schema,
)
from node.upstream import AiohttpTransport
from tests.gateway_process import GatewayProcess
from tests.upstreams import gemini_api
from tests.upstreams.server import UpstreamServer, UpstreamState

KEY = "gm-upstream-secret"
Upstream = tuple[UpstreamServer, UpstreamState]

WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
}}
PNG = "data:image/png;base64,iVBORw0KGgo="


# -- pure translation ------------------------------------------------------------------------


def test_chat_request_maps_every_part() -> None:
    body = {
        "model": "gemini-2.0-flash",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": PNG}}]},
            {"role": "assistant", "content": "let me look", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"x": 1}'}},
                {"id": "c2", "type": "function", "function": {"name": "zoom", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"seen": "a cat"}'},
            {"role": "tool", "tool_call_id": "c2", "content": "done"},
            {"role": "user", "content": "so?"},
        ],
        "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "noop", "parameters": {
            "type": "object", "properties": {}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "stop": "END", "seed": 7,
        "response_format": {"type": "json_object"},
        "stream_options": {"include_usage": True},
    }
    assert chat_request(body) == {
        "systemInstruction": {"parts": [{"text": "be brief"}, {"text": "and kind"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "what is this?"},
                                       {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
            {"role": "model", "parts": [{"text": "let me look"},
                                        {"functionCall": {"name": "look", "args": {"x": 1}}},
                                        {"functionCall": {"name": "zoom", "args": {}}}]},
            # Both tool results and the next user turn merge into one user turn.
            {"role": "user", "parts": [
                {"functionResponse": {"name": "look", "response": {"seen": "a cat"}}},
                {"functionResponse": {"name": "zoom", "response": {"output": "done"}}},
                {"text": "so?"}]},
        ],
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather for a city",
             "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}},
            {"name": "noop"}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 50,
                             "stopSequences": ["END"], "responseMimeType": "application/json"},
    }


def test_chat_request_audio_files_legacy_functions_and_schemas() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]},
            {"role": "assistant", "content": ""},
            {"role": "function", "name": "lookup", "content": "[1, 2]"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "none",
        "n": 2,
        "max_completion_tokens": 9,
        "max_tokens": 99,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}}},
    }
    out = chat_request(body)
    assert out["contents"] == [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        # The empty assistant turn is dropped: Gemini rejects a turn without parts.
        {"functionResponse": {"name": "lookup", "response": {"output": [1, 2]}}}]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}
    assert out["generationConfig"] == {
        "candidateCount": 2, "maxOutputTokens": 9, "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "INTEGER"}}}}


def test_chat_request_rejects_what_gemini_cannot_take() -> None:
    def req(*messages: Any) -> dict[str, Any]:
        return {"model": "m", "messages": list(messages)}

    with pytest.raises(InvalidField, match="data: URLs"):
        chat_request(req({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}))
    with pytest.raises(InvalidField, match="does not answer"):
        chat_request(req({"role": "tool", "tool_call_id": "nope", "content": "x"}))
    with pytest.raises(InvalidField, match="JSON object"):
        chat_request(req({"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}))


def test_gemini_schema_keeps_only_what_gemini_accepts() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
        "properties": {
            "when": {"type": ["string", "null"], "format": "date-time"},
            "mail": {"type": "string", "format": "email"},
            "kind": {"const": "a"},
            "tags": {"type": "array", "items": {"type": "string", "examples": ["x"]}},
            "any": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["when"],
    }
    assert gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "when": {"type": "STRING", "nullable": True, "format": "date-time"},
            "mail": {"type": "STRING"},
            "kind": {"enum": ["a"]},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
            "any": {"anyOf": [{"type": "INTEGER"}, {"nullable": True}]},
        },
        "required": ["when"],
    }


def test_chat_response_text_tool_calls_and_finish_reasons() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, reported=True)
    data = {"candidates": [
        {"index": 0, "finishReason": "STOP", "content": {"role": "model", "parts": [
            {"text": "hidden", "thought": True}, {"text": "Hi "}, {"text": "there"}]}},
        {"index": 1, "finishReason": "STOP", "content": {"role": "model", "parts": [
            {"functionCall": {"name": "f", "args": {"a": 1}}}, {"functionCall": {"id": "g1", "name": "g"}}]}},
        {"index": 2, "finishReason": "MAX_TOKENS", "content": {"role": "model", "parts": [{"text": "cut"}]}},
        {"index": 3, "finishReason": "RECITATION"},
    ]}
    out = chat_response(data, model="gemini-x", response_id="r1", created=5, usage=usage)
    assert out["id"] == "chatcmpl-r1" and out["model"] == "gemini-x" and out["created"] == 5
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    c0, c1, c2, c3 = out["choices"]
    assert c0["message"]["content"] == "Hi there" and c0["finish_reason"] == "stop"
    assert c1["finish_reason"] == "tool_calls" and c1["message"]["content"] is None
    assert c1["message"]["tool_calls"] == [
        {"id": "call_r1_1_0", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "g1", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert c2["finish_reason"] == "length"
    assert c3["finish_reason"] == "content_filter" and c3["message"]["content"] == ""
    blocked = chat_response({"promptFeedback": {"blockReason": "SAFETY"}}, model="m", response_id="r",
                            created=0, usage=Usage())
    assert blocked["choices"][0]["finish_reason"] == "content_filter"


def test_chat_stream_translation() -> None:
    usage = Usage()
    s = ChatStream(model="m", response_id="r", created=1, usage=usage, include_usage=True)
    meta = {"promptTokenCount": 4, "totalTokenCount": 4}

    def cand(parts: list[Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "content": {"role": "model", "parts": parts}}
        if finish:
            c["finishReason"] = finish
        return {"candidates": [c], "usageMetadata": meta}

    deltas = [c["choices"][0]["delta"] for c in s.feed(cand([{"text": "Hel"}]))]
    assert deltas == [{"role": "assistant", "content": "", "refusal": None}, {"content": "Hel"}]
    assert [c["choices"][0]["delta"] for c in s.feed(cand([{"text": "lo"}]))] == [{"content": "lo"}]
    meta = {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 5, "totalTokenCount": 11}
    out = s.feed(cand([{"functionCall": {"name": "f", "args": {"q": "x"}}}], "STOP"))
    assert out[0]["choices"][0]["delta"] == {"tool_calls": [{
        "index": 0, "id": "call_r_0_0", "type": "function", "function": {"name": "f", "arguments": '{"q":"x"}'}}]}
    assert out[1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r" for c in out)
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, 7)
    tail = s.finish()
    assert tail == [{"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}}]


def test_chat_stream_without_finish_reason_or_candidates() -> None:
    s = ChatStream(model="m", response_id="r", created=1, usage=Usage(), include_usage=False)
    s.feed({"candidates": [{"index": 0, "content": {"parts": [{"text": "a"}]}}]})
    assert [c["choices"][0]["finish_reason"] for c in s.finish()] == ["stop"]
    empty = ChatStream(model="m", response_id="r", created=1, usage=Usage(), include_usage=False)
    with pytest.raises(UpstreamUnavailable):
        empty.finish()


def test_embed_request() -> None:
    assert embed_request({"input": ["a", "b"], "dimensions": 8}, "text-embedding-004") == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 8},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 8},
    ]}
    with pytest.raises(InvalidField):
        embed_request({"input": [[1, 2, 3]]}, "m")


def test_error_from_status_reads_google_details() -> None:
    p = GeminiProvider(name="g", config=ProviderConfig(type="gemini"),
                       transport=AiohttpTransport(ProviderConfig(type="gemini")))
    bad_key = gemini_api.error_body(400, "API key not valid.", [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}])
    err = p.error_from_status(400, bad_key, None)
    assert err.status == 502 and err.code == "upstream_auth_failed"
    limited = gemini_api.error_body(429, "Quota exceeded", [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "23s"}])
    err = p.error_from_status(429, limited, None)
    assert err.status == 429 and err.retry_after == 23.0 and "Quota exceeded" in err.message
    assert p.error_from_status(429, limited, "2").retry_after == 2.0
    err = p.error_from_status(400, gemini_api.error_body(400, "bad schema"), None)
    assert err.status == 400 and err.message.endswith("bad schema")


# -- through the gateway ---------------------------------------------------------------------


@pytest.fixture
def gemini_upstream() -> Iterator[Upstream]:
    state = UpstreamState()
    server = UpstreamServer(gemini_api.make_app(state, api_key=KEY)).start()
    try:
        yield server, state
    finally:
        server.stop()


def _config(url: str, key: str = KEY) -> dict[str, Any]:
    return {
        "providers": {"gm": {"type": "gemini", "base_url": url, "api_key": key}},
        # One attempt: these tests pin how an upstream answer maps, not the retry policy.
        "reliability": {"retry": {"max_attempts": 1}},
        "models": [
            {"name": "flash", "provider": "gm", "model": "gemini-2.0-flash"},
            {"name": "embed", "provider": "gm", "model": "text-embedding-004"},
        ],
    }


@pytest.fixture
def gw(gateway: Callable[..., GatewayProcess], gemini_upstream: Upstream) -> GatewayProcess:
    return gateway(_config(gemini_upstream[0].url))


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=20) as c:
        yield c


def _collect(stream: Any) -> tuple[list[Any], str, dict[int, dict[str, str]], str | None]:
    """All chunks, the text, the tool calls by index, and the finish reason."""
    chunks = list(stream)
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for c in chunks:
        for ch in c.choices:
            text += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                slot["id"] += tc.id or ""
                slot["name"] += tc.function.name or "" if tc.function else ""
                slot["args"] += tc.function.arguments or "" if tc.function else ""
            finish = ch.finish_reason or finish
    return chunks, text, calls, finish


def test_chat_with_system_prompt(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    r = client.chat.completions.create(
        model="flash", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        temperature=0.3, max_tokens=20, stop=["END"])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "flash"  # the name the client asked for; the upstream's is in x-hapax-upstream-model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello from upstream!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 3, 14)
    seen = state.seen[-1]
    assert seen.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert seen.query == {}
    assert seen.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in seen.headers
    assert seen.body == {
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"temperature": 0.3, "maxOutputTokens": 20, "stopSequences": ["END"]},
    }


def test_streaming_text_with_and_without_usage(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    chunks, text, _, finish = _collect(client.chat.completions.create(
        model="flash", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert text == "Hello from upstream!" and finish == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 3)
    seen = state.seen[-1]
    assert seen.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    assert seen.query == {"alt": "sse"}
    assert "stream_options" not in seen.body and "stream" not in seen.body

    chunks, text, _, finish = _collect(client.chat.completions.create(
        model="flash", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert text == "Hello from upstream!" and finish == "stop"
    assert all(c.usage is None and c.choices for c in chunks)


def test_tool_call_then_tool_result(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    r = client.chat.completions.create(
        model="flash", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER_TOOL])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    decl = state.seen[-1].body["tools"][0]["functionDeclarations"][0]
    assert decl["parameters"] == {"type": "OBJECT", "properties": {"city": {"type": "STRING"}},
                                  "required": ["city"]}

    messages: Any = [
        {"role": "user", "content": "weather in Paris?"},
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    r = client.chat.completions.create(model="flash", messages=messages, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "Hello from upstream!"
    assert state.seen[-1].body["contents"] == [
        {"role": "user", "parts": [{"text": "weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                         "response": {"forecast": "sunny"}}}]},
    ]


def test_streamed_tool_call_then_tool_result(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    _, text, calls, finish = _collect(client.chat.completions.create(
        model="flash", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL],
        tool_choice="required", stream=True))
    assert text == "" and finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert orjson.loads(calls[0]["args"]) == {"city": "Paris"}
    assert state.seen[-1].body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    messages: Any = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": calls[0]["id"], "type": "function", "function": {
            "name": calls[0]["name"], "arguments": calls[0]["args"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ]
    _, text, calls, finish = _collect(client.chat.completions.create(
        model="flash", messages=messages, tools=[WEATHER_TOOL], stream=True))
    assert text == "Hello from upstream!" and finish == "stop" and not calls
    assert state.seen[-1].body["contents"][-1] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}]}


def test_image_part_and_json_mode(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    r = client.chat.completions.create(
        model="flash", response_format={"type": "json_object"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe as JSON"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]}])
    assert orjson.loads(r.choices[0].message.content or "") == {"reply": "Hello from upstream!"}
    sent = state.seen[-1].body
    assert sent["contents"][0]["parts"] == [
        {"text": "describe as JSON"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]
    assert sent["generationConfig"] == {"responseMimeType": "application/json"}


def test_remote_image_url_is_a_400_before_any_upstream_call(
    client: openai.OpenAI, gemini_upstream: Upstream
) -> None:
    _, state = gemini_upstream
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="flash", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "data: URLs" in info.value.message
    assert state.seen == []


def test_embeddings_base64_and_float(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    r = client.embeddings.create(model="embed", input=["a", "b"])  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1]
    assert r.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])
    assert r.data[1].embedding == pytest.approx([0.2, 0.2, 0.3])
    assert r.model == "embed"
    seen = state.seen[-1]
    assert seen.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert seen.headers["x-goog-api-key"] == KEY
    assert seen.body == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a"}]}},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]}},
    ]}
    r = client.embeddings.create(model="embed", input="a", encoding_format="float", dimensions=5)
    assert r.data[0].embedding == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.5])
    assert state.seen[-1].body["requests"][0]["outputDimensionality"] == 5


def test_finish_reasons_through_the_sdk(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    msgs: Any = [{"role": "user", "content": "hi"}]
    state.faults.append({"finish_reason": "MAX_TOKENS"})
    assert client.chat.completions.create(model="flash", messages=msgs).choices[0].finish_reason == "length"
    state.faults.append({"finish_reason": "SAFETY"})
    _, _, _, finish = _collect(client.chat.completions.create(model="flash", messages=msgs, stream=True))
    assert finish == "content_filter"
    state.faults.append({"block_prompt": "SAFETY"})
    r = client.chat.completions.create(model="flash", messages=msgs)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == ""
    state.faults.append({"block_prompt": "SAFETY"})
    _, text, _, finish = _collect(client.chat.completions.create(model="flash", messages=msgs, stream=True))
    assert text == "" and finish == "content_filter"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "exc", "status", "code"),
    [
        ({"status": 400, "message": "Invalid value at 'contents'"}, openai.BadRequestError, 400,
         "upstream_bad_request"),
        ({"status": 429, "retry_delay": "7s", "message": "Resource has been exhausted"}, openai.RateLimitError,
         429, "upstream_rate_limited"),
        ({"status": 500, "message": "An internal error has occurred"}, openai.InternalServerError, 502,
         "upstream_unavailable"),
    ],
)
def test_upstream_errors_reach_the_client(
    client: openai.OpenAI, gemini_upstream: Upstream, fault: dict[str, Any], exc: type[openai.APIStatusError],
    status: int, code: str, stream: bool,
) -> None:
    _, state = gemini_upstream
    state.faults.append(fault)
    with pytest.raises(exc) as info:
        r: Any = client.chat.completions.create(
            model="flash", messages=[{"role": "user", "content": "hi"}], stream=stream)
        if stream:
            list(r)
    err = info.value
    assert err.status_code == status and err.code == code
    body: Any = err.body
    assert fault["message"] in body["message"] and body["request_id"].startswith("req_")
    assert err.response.headers["content-type"] == "application/json"
    if status == 429:
        assert err.response.headers["retry-after"] == "7"


def test_bad_upstream_key_is_the_gateways_fault(
    gateway: Callable[..., GatewayProcess], gemini_upstream: Upstream
) -> None:
    server, _ = gemini_upstream
    gw = gateway(_config(server.url, key="wrong"))
    with (
        openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20) as client,
        pytest.raises(openai.APIStatusError) as info,
    ):
        client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"


def test_error_inside_the_stream_ends_with_an_error_event(
    client: openai.OpenAI, gemini_upstream: Upstream
) -> None:
    _, state = gemini_upstream
    state.faults.append({"stream_error_after": 1})
    text = ""
    with pytest.raises(openai.APIError, match="internal error"):
        for c in client.chat.completions.create(
            model="flash", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            text += c.choices[0].delta.content or "" if c.choices else ""
    assert text == "Hello"


def test_cut_stream_ends_with_an_error_event(client: openai.OpenAI, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    state.faults.append({"truncate_stream_after": 1})
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))


def test_usage_is_counted_in_metrics(client: openai.OpenAI, gw: GatewayProcess) -> None:
    client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}], stream=True))
    client.embeddings.create(model="embed", input="some words to embed")
    text = httpx.get(gw.url + "/metrics", timeout=5).text

    def count(model: str, direction: str) -> int:
        m = re.search(rf'hapax_tokens_total\{{direction="{direction}",model="{model}",provider="gm"\}} (\d+)', text)
        assert m is not None, text
        return int(m.group(1))

    assert count("flash", "input") == 22
    assert count("flash", "output") == 6
    assert count("embed", "input") > 0  # Gemini reports no embedding tokens: the gateway's estimate


def test_other_operations_reach_gemini_through_chat(gw: GatewayProcess, gemini_upstream: Upstream) -> None:
    _, state = gemini_upstream
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20) as client:
        r = client.completions.create(model="flash", prompt="Say hi")
        assert r.choices[0].text == "Hello from upstream!"
    assert state.seen[-1].body["contents"] == [{"role": "user", "parts": [{"text": "Say hi"}]}]
    with anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=20) as claude:
        m = claude.messages.create(model="flash", max_tokens=30, system="be brief",
                                   messages=[{"role": "user", "content": "hi"}])
        assert m.content[0].type == "text" and m.content[0].text == "Hello from upstream!"
        assert m.usage.input_tokens == 11 and m.usage.output_tokens == 3
        with claude.messages.stream(model="flash", max_tokens=30,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            assert s.get_final_text() == "Hello from upstream!"
    assert state.seen[-2].body["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert state.seen[-2].body["generationConfig"] == {"maxOutputTokens": 30}
