"""Pure tests of the chat <-> messages and completions -> chat translations: dicts in, dicts out."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from hapax._errors import InvalidField, UpstreamUnavailable
from hapax._sse import SSEDecoder, SSEEvent, encode
from hapax._usage import Usage
from hapax.api._translate import find_translation
from hapax.api._translate_anthropic import (
    DEFAULT_MAX_TOKENS,
    ChatFromMessagesStream,
    MessagesFromChatStream,
    chat_to_messages_request,
    chat_to_messages_response,
    messages_to_chat_request,
    messages_to_chat_response,
)
from hapax.api._translate_completions import completions_to_chat_request
from hapax.providers import Operation

TOOL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def _ev(name: str, **data: Any) -> SSEEvent:
    return SSEEvent(data=orjson.dumps({"type": name, **data}), event=name)


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> SSEEvent:
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
                            **extra}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return SSEEvent(data=orjson.dumps(body))


def _data(events: list[SSEEvent]) -> list[Any]:
    return [orjson.loads(e.data) for e in events]


# -- chat -> messages: requests -------------------------------------------------------------


def test_chat_request_system_tools_and_merged_turns() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "one"},
            {"role": "developer", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "checking", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city":"A"}'}},
                {"id": "c2", "type": "function", "function": {"name": "w", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rainy"}]},
            {"role": "user", "content": "and so?"},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "description": "d", "parameters": TOOL_SCHEMA}},
                  {"type": "function", "function": {"name": "bare"}}],
        "tool_choice": {"type": "function", "function": {"name": "w"}},
        "parallel_tool_calls": False,
        "temperature": 1.7, "top_p": 0.9, "stop": "END", "stream": True,
        "stream_options": {"include_usage": True}, "user": "u-1",
    }
    before = copy.deepcopy(body)
    out = chat_to_messages_request(body)
    assert body == before  # the client's body is reused for the stream translator
    assert out["system"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert out["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "checking"},
            {"type": "tool_use", "id": "c1", "name": "w", "input": {"city": "A"}},
            {"type": "tool_use", "id": "c2", "name": "w", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "rainy"},
            {"type": "text", "text": "and so?"}]},
    ]
    assert out["tools"] == [{"name": "w", "description": "d", "input_schema": TOOL_SCHEMA},
                            {"name": "bare", "input_schema": {"type": "object", "properties": {}}}]
    assert out["tool_choice"] == {"type": "tool", "name": "w", "disable_parallel_tool_use": True}
    assert out["temperature"] == 1.0
    assert (out["top_p"], out["stop_sequences"], out["stream"]) == (0.9, ["END"], True)
    assert out["metadata"] == {"user_id": "u-1"}
    assert out["max_tokens"] == DEFAULT_MAX_TOKENS
    assert "stream_options" not in out and "parallel_tool_calls" not in out


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
])
def test_chat_tool_choice(choice: str, expected: dict[str, Any]) -> None:
    out = chat_to_messages_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                    "tools": [{"type": "function", "function": {"name": "w"}}],
                                    "tool_choice": choice})
    assert out["tool_choice"] == expected


def test_chat_request_images_files_and_limits() -> None:
    out = chat_to_messages_request({"model": "m", "max_tokens": 7, "max_completion_tokens": 9, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"}},
        ]}]})
    assert out["max_tokens"] == 9
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
    ]


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": 1}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": {"id": "c"}}]}, "messages[0]"),
])
def test_chat_request_refuses_what_anthropic_cannot_express(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InvalidField) as info:
        chat_to_messages_request(full)
    assert info.value.param == param


# -- chat -> messages: responses and streams ------------------------------------------------


def test_messages_response_as_chat() -> None:
    usage = Usage()
    usage.take_anthropic({"input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 4})
    out = messages_to_chat_response({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Let me "}, {"type": "text", "text": "see."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "A"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 4},
    }, usage, created=42)
    assert out["id"] == "msg_1" and out["created"] == 42 and out["model"] == "claude"
    msg = out["choices"][0]["message"]
    assert msg["content"] == "Let me see."
    assert msg["tool_calls"] == [{"id": "toolu_1", "type": "function",
                                  "function": {"name": "w", "arguments": '{"city":"A"}'}}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12,
                            "prompt_tokens_details": {"cached_tokens": 3}}


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), (None, "stop"),
])
def test_stop_reasons_to_finish_reasons(stop: str | None, finish: str) -> None:
    out = messages_to_chat_response({"content": [], "stop_reason": stop}, Usage(), created=0)
    assert out["choices"][0]["finish_reason"] == finish


def _anthropic_events() -> list[SSEEvent]:
    return [
        _ev("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
                                      "content": [], "usage": {"input_tokens": 11, "output_tokens": 1}}),
        _ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _ev("ping"),
        _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
        _ev("content_block_stop", index=0),
        _ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1", "name": "w",
                                                           "input": {}}),
        _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"ci'}),
        _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": 'ty":"A"}'}),
        _ev("content_block_stop", index=1),
        _ev("content_block_start", index=2, content_block={"type": "tool_use", "id": "toolu_2", "name": "v",
                                                           "input": {}}),
        _ev("content_block_stop", index=2),
        _ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
            usage={"output_tokens": 7}),
        _ev("message_stop"),
    ]


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_from_anthropic_events(include_usage: bool) -> None:
    t = ChatFromMessagesStream("fallback", include_usage=include_usage, created=5)
    out = _data([o for ev in _anthropic_events() for o in t.feed(ev)] + t.finish(Usage()))
    assert all(c["id"] == "msg_1" and c["model"] == "claude" and c["created"] == 5 for c in out)
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                         "function": {"name": "w", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"A"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function",
                         "function": {"name": "v", "arguments": ""}}]},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]][-1] == "tool_calls"
    if include_usage:
        assert out[-1]["choices"] == []
        assert out[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    else:
        assert all("usage" not in c for c in out)


def test_chat_stream_cut_before_message_stop_is_an_error() -> None:
    t = ChatFromMessagesStream("m", include_usage=False, created=0)
    for ev in _anthropic_events()[:4]:
        t.feed(ev)
    with pytest.raises(UpstreamUnavailable):
        t.finish(Usage())
    with pytest.raises(UpstreamUnavailable, match="Overloaded"):
        t.feed(_ev("error", error={"type": "overloaded_error", "message": "Overloaded"}))


# -- messages -> chat: requests -------------------------------------------------------------


def test_messages_request_as_chat() -> None:
    body: dict[str, Any] = {
        "model": "m", "max_tokens": 30, "temperature": 0.2, "top_k": 3, "stop_sequences": ["X"], "stream": True,
        "metadata": {"user_id": "u"},
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {"type": "x"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "A"}},
                {"type": "tool_use", "id": "t2", "name": "w", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "sunny"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0"}}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "rainy", "is_error": True},
                {"type": "text", "text": "thanks"}]},
        ],
        "tools": [{"name": "w", "description": "d", "input_schema": TOOL_SCHEMA}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    before = copy.deepcopy(body)
    out = messages_to_chat_request(body)
    assert body == before
    assert out["messages"] == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}}]},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"city":"A"}'}},
            {"id": "t2", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "rainy"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0"}},
            {"type": "text", "text": "thanks"}]},
    ]
    assert out["tools"] == [{"type": "function", "function": {"name": "w", "description": "d",
                                                              "parameters": TOOL_SCHEMA}}]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert (out["max_tokens"], out["temperature"], out["stop"], out["user"]) == (30, 0.2, ["X"], "u")
    assert out["stream_options"] == {"include_usage": True}
    assert out["top_k"] == 3  # under its own name: OpenAI refuses it loudly, others take it


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "w"}, {"type": "function", "function": {"name": "w"}}),
])
def test_messages_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    out = messages_to_chat_request({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                    "tools": [{"name": "w", "input_schema": TOOL_SCHEMA}], "tool_choice": choice})
    assert out["tool_choice"] == expected


def test_messages_request_refuses_server_tools() -> None:
    with pytest.raises(InvalidField) as info:
        messages_to_chat_request({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert info.value.param == "tools[0]"


def test_round_trip_keeps_a_tool_conversation() -> None:
    chat: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]}
    back = messages_to_chat_request(chat_to_messages_request(chat))
    assert back["messages"] == chat["messages"]


# -- messages -> chat: responses and streams ------------------------------------------------


def test_chat_response_as_message() -> None:
    usage = Usage(prompt_tokens=9, completion_tokens=4, cached_tokens=2)
    out = chat_to_messages_response({
        "id": "chatcmpl-1", "model": "gpt", "choices": [{"index": 0, "finish_reason": "length", "message": {
            "role": "assistant", "content": "partial", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{bad"}}]}}]}, usage)
    assert out["type"] == "message" and out["role"] == "assistant" and out["model"] == "gpt"
    assert out["content"] == [
        {"type": "text", "text": "partial"},
        {"type": "tool_use", "id": "c1", "name": "w", "input": {"a": 1}},
        {"type": "tool_use", "id": "c2", "name": "w", "input": {"_raw_arguments": "{bad"}},
    ]
    assert out["stop_reason"] == "max_tokens"
    assert out["usage"] == {"input_tokens": 7, "cache_read_input_tokens": 2, "output_tokens": 4}


def _chat_chunks() -> list[SSEEvent]:
    return [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                "function": {"name": "w", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "c2", "type": "function",
                                "function": {"name": "v", "arguments": "{}"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk({}, "tool_calls"),
        _chunk(choices=[], usage={"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}),
    ]


def test_message_events_from_chat_chunks() -> None:
    t = MessagesFromChatStream("fallback", input_tokens=3)
    events = [o for ev in _chat_chunks() for o in t.feed(ev)] + t.finish(Usage())
    names = [e.event for e in events]
    data = _data(events)
    assert all(d["type"] == n for d, n in zip(data, names, strict=True))
    assert names == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = data[0]["message"]
    assert (start["id"], start["model"], start["usage"]) == ("chatcmpl-1", "gpt",
                                                            {"input_tokens": 3, "output_tokens": 0})
    assert [d["index"] for d in data if d["type"] == "content_block_start"] == [0, 1, 2]
    assert data[5]["content_block"] == {"type": "tool_use", "id": "c1", "name": "w", "input": {}}
    # A late fragment of the first tool still lands on its own block.
    assert data[10] == {"type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": "1}"}}
    assert data[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert data[-2]["usage"] == {"input_tokens": 20, "cache_read_input_tokens": 0, "output_tokens": 6}


def test_message_events_survive_one_byte_delivery() -> None:
    wire = b"".join(encode(e.data) for e in _chat_chunks()) + b"data: [DONE]\n\n"
    decoder = SSEDecoder()
    t = MessagesFromChatStream("m", input_tokens=0)
    out: list[SSEEvent] = []
    for i in range(len(wire)):
        for ev in decoder.feed(wire[i:i + 1]):
            if ev.data != b"[DONE]":
                out += t.feed(ev)
    out += t.finish(Usage())
    text = "".join(d["delta"].get("text", "") for d in _data(out) if d["type"] == "content_block_delta")
    assert text == "Hello"


def test_message_stream_uses_reply_usage_and_refuses_a_cut() -> None:
    t = MessagesFromChatStream("m", input_tokens=0)
    for ev in _chat_chunks()[:3]:
        t.feed(ev)
    with pytest.raises(UpstreamUnavailable):
        t.finish(Usage())
    t = MessagesFromChatStream("m", input_tokens=0)
    for ev in [*_chat_chunks()[:3], _chunk({}, "stop")]:
        t.feed(ev)
    final = _data(t.finish(Usage(prompt_tokens=4, completion_tokens=2)))
    assert final[0] == {"type": "content_block_stop", "index": 0}
    assert final[1]["delta"]["stop_reason"] == "end_turn"
    assert final[1]["usage"]["output_tokens"] == 2


# -- composition: completions -> chat -> messages -------------------------------------------


def test_completions_reach_messages_through_chat() -> None:
    t = find_translation(Operation.COMPLETIONS, frozenset({Operation.MESSAGES}))
    assert t is not None and t.target is Operation.MESSAGES
    body = {"model": "m", "prompt": ["Say hi"], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    req = t.request(body)
    assert req["messages"] == [{"role": "user", "content": "Say hi"}]
    assert req["max_tokens"] == 5 and req["stream"] is True
    usage = Usage(prompt_tokens=11, completion_tokens=7, reported=True)
    resp = t.response({"id": "msg_1", "model": "c", "content": [{"type": "text", "text": "Hi"}],
                       "stop_reason": "max_tokens"}, usage)
    assert resp["object"] == "text_completion"
    assert resp["choices"][0]["text"] == "Hi" and resp["choices"][0]["finish_reason"] == "length"
    s = t.stream("c", body)
    out = _data([o for ev in _anthropic_events()[:5] for o in s.feed(ev)]
                 + s.feed(_ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 7}))
                 + s.feed(_ev("message_stop")) + s.finish(usage))
    assert [c["choices"][0]["text"] for c in out if c["choices"]] == ["Hi", ""]
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["object"] == "text_completion" and out[-1]["usage"]["total_tokens"] == 18


@pytest.mark.parametrize(("extra", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"echo": True}, "echo"),
    ({"suffix": "x"}, "suffix"),
])
def test_completions_refuses_what_chat_cannot_express(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidField) as info:
        completions_to_chat_request({"model": "m", "prompt": "p", **extra})
    assert info.value.param == param
