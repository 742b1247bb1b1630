"""Anthropic both ways, through a real gateway process and the official SDKs.

- the ``anthropic`` SDK against the mock provider, an OpenAI upstream
  (messages -> chat) and an Anthropic upstream (pass-through);
- the ``openai`` SDK against an Anthropic upstream (chat -> messages, and
  completions -> chat -> messages);
- errors in both shapes, before and after the first byte; token metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess
from tests.upstreams import anthropic_api
from tests.upstreams.server import UpstreamServer, UpstreamState

CLIENT_KEY = "client-key-never-forwarded"
UPSTREAM_KEY = "sk-ant-upstream-secret"
WEATHER: Any = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_FN: Any = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": WEATHER["input_schema"]}}
PNG = "iVBORw0KGgo="


@pytest.fixture
def anthropic_upstream() -> Iterator[tuple[UpstreamServer, UpstreamState]]:
    state = UpstreamState()
    server = UpstreamServer(anthropic_api.make_app(state)).start()
    try:
        yield server, state
    finally:
        server.stop()


@pytest.fixture
def gw(
    gateway: Callable[..., GatewayProcess],
    openai_upstream: tuple[UpstreamServer, UpstreamState],
    anthropic_upstream: tuple[UpstreamServer, UpstreamState],
) -> GatewayProcess:
    return gateway({
        "providers": {
            "claude": {"type": "anthropic", "base_url": anthropic_upstream[0].url, "api_key": UPSTREAM_KEY},
            "oai": {"type": "openai", "base_url": openai_upstream[0].url + "/v1", "api_key": "sk-openai"},
            "demo": {"type": "mock"},
        },
        "models": [
            {"name": "claude-sonnet", "provider": "claude", "model": "claude-sonnet-upstream"},
            {"name": "gpt-4o-mini", "provider": "oai"},
            {"name": "demo", "provider": "demo"},
        ],
    })


@pytest.fixture
def ac(gw: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
def oc(gw: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20) as c:
        yield c


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# -- anthropic SDK -> mock -----------------------------------------------------------------


def test_messages_against_mock(ac: anthropic.Anthropic) -> None:
    m = ac.messages.create(model="demo", max_tokens=100, messages=_user("ping"))
    assert m.content[0].type == "text" and m.content[0].text == "Hello from Hapax! You said: ping"
    assert m.stop_reason == "end_turn"
    with ac.messages.stream(model="demo", max_tokens=100, messages=_user("ping")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from Hapax! You said: ping"
    assert final.usage.output_tokens == 6


# -- anthropic SDK -> OpenAI upstream (messages -> chat) -------------------------------------


def test_messages_to_openai_upstream(
    ac: anthropic.Anthropic, openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = openai_upstream
    m = ac.messages.create(model="gpt-4o-mini", max_tokens=50, system="Be brief.",
                           messages=_user("hi"), stop_sequences=["END"],
                           extra_body={"temperature": 0.5})
    assert m.content[0].type == "text" and m.content[0].text == "Hello from upstream!"
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (10, 3)
    sent = state.seen[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == "Bearer sk-openai"
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (sent.body["max_tokens"], sent.body["stop"], sent.body["temperature"]) == (50, ["END"], 0.5)


def test_messages_tools_to_openai_upstream(
    ac: anthropic.Anthropic, openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = openai_upstream
    m = ac.messages.create(model="gpt-4o-mini", max_tokens=50, messages=_user("weather?"), tools=[WEATHER],
                           tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    sent = state.seen[-1].body
    assert sent["tools"] == [WEATHER_FN]
    assert sent["tool_choice"] == "required"

    # The tool result goes back as an OpenAI tool message right after the assistant's call.
    state.faults = []
    ac.messages.create(model="gpt-4o-mini", max_tokens=50, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
    ])
    msgs = state.seen[-1].body["messages"]
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert msgs[2] == {"role": "tool", "tool_call_id": use.id, "content": "sunny"}


def test_messages_stream_to_openai_upstream(
    ac: anthropic.Anthropic, openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = openai_upstream
    with ac.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=_user("hi")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from upstream!"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 3)
    assert state.seen[-1].body["stream_options"] == {"include_usage": True}

    with ac.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=_user("weather?"),
                            tools=[WEATHER]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    use = final.content[-1]
    assert use.type == "tool_use" and use.id == "call_up1" and use.input == {"city": "Paris"}


def test_raw_event_sequence_from_openai_upstream(gw: GatewayProcess) -> None:
    """The exact event order Anthropic clients rely on, straight off the wire."""
    with httpx.stream("POST", gw.url + "/v1/messages", timeout=20, json={
        "model": "gpt-4o-mini", "max_tokens": 20, "stream": True, "tools": [WEATHER],
        "messages": _user("weather?"),
    }) as r:
        body = r.read().decode()
    names = re.findall(r"^event: (\w+)$", body, re.M)
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in body


# -- anthropic SDK -> Anthropic upstream (pass-through) ------------------------------------


def test_messages_pass_through(
    ac: anthropic.Anthropic, anthropic_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = anthropic_upstream
    m = ac.messages.create(model="claude-sonnet", max_tokens=64, messages=_user("hi"),
                           extra_body={"top_k": 5})
    assert m.content[0].type == "text" and m.content[0].text == "Hello from upstream!"
    assert m.usage.input_tokens == anthropic_api.INPUT_TOKENS
    seen = state.seen[-1]
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    assert CLIENT_KEY not in str(seen.headers)
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body == {"model": "claude-sonnet-upstream", "max_tokens": 64, "messages": _user("hi"), "top_k": 5}

    with ac.messages.stream(model="claude-sonnet", max_tokens=64, messages=_user("hi"), tools=[WEATHER]) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in events
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert state.seen[-1].headers["x-api-key"] == UPSTREAM_KEY


# -- openai SDK -> Anthropic upstream (chat -> messages) -----------------------------------


def test_chat_to_anthropic_with_tools_system_and_image(
    oc: openai.OpenAI, anthropic_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = anthropic_upstream
    r = oc.chat.completions.create(
        model="claude-sonnet",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather where this was taken?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
        ],
        tools=[WEATHER_FN], tool_choice="auto", stop="STOP",
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == anthropic_api.TOOL_PREAMBLE
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id == "toolu_up1" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city":"Paris"}'  # type: ignore[union-attr]
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (12, 9)

    seen = state.seen[-1]
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    sent = seen.body
    assert sent["system"] == "You are terse."
    assert sent["max_tokens"] == 4096
    assert sent["stop_sequences"] == ["STOP"]
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == {"type": "auto"}
    assert sent["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]

    # Tool results go back as one user turn of tool_result blocks (the upstream checks the ids).
    r2 = oc.chat.completions.create(model="claude-sonnet", max_completion_tokens=99, messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "rainy"},
    ], tools=[WEATHER_FN])
    assert r2.choices[0].message.content == "Hello from upstream!"
    assert r2.choices[0].finish_reason == "stop"
    sent = state.seen[-1].body
    assert sent["max_tokens"] == 99
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"][1] == {
        "type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Rome"}}
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "rainy"},
    ]


def test_chat_stream_to_anthropic(oc: openai.OpenAI, anthropic_upstream: tuple[UpstreamServer, UpstreamState]) -> None:
    _, state = anthropic_upstream
    chunks = list(oc.chat.completions.create(
        model="claude-sonnet", messages=_user("hi"), stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from upstream!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 3)
    assert state.seen[-1].body["stream"] is True and "stream_options" not in state.seen[-1].body

    # Without include_usage there is no usage chunk; tool call fragments arrive indexed.
    chunks = list(oc.chat.completions.create(
        model="claude-sonnet", messages=_user("weather?"), tools=[WEATHER_FN], stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id == "toolu_up1" and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert {tc.index for tc in calls} == {0}
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_completions_to_anthropic(oc: openai.OpenAI, anthropic_upstream: tuple[UpstreamServer, UpstreamState]) -> None:
    _, state = anthropic_upstream
    r = oc.completions.create(model="claude-sonnet", prompt="Say hi", max_tokens=20)
    assert r.object == "text_completion"
    assert r.choices[0].text == "Hello from upstream!" and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens == 12
    assert state.seen[-1].body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert state.seen[-1].body["max_tokens"] == 20

    chunks = list(oc.completions.create(model="claude-sonnet", prompt=["Say hi"], stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from upstream!"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


# -- errors --------------------------------------------------------------------------------


def test_anthropic_400_reaches_openai_client(
    oc: openai.OpenAI, anthropic_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = anthropic_upstream
    state.faults.append({"status": 400, "message": "messages.0.content: image too large"})
    with pytest.raises(openai.BadRequestError) as info:
        oc.chat.completions.create(model="claude-sonnet", messages=_user("hi"))
    assert "image too large" in info.value.message
    assert info.value.code == "upstream_bad_request"

    # Retryable: queue one per attempt the retry policy may make.
    state.faults.extend([{"status": 529, "message": "Overloaded"}] * 3)
    with pytest.raises(openai.InternalServerError) as err:
        oc.chat.completions.create(model="claude-sonnet", messages=_user("hi"))
    assert err.value.status_code == 502 and "overloaded_error" in err.value.message


def test_messages_errors_are_anthropic_shaped(ac: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        ac.messages.create(model="nope", max_tokens=5, messages=_user("hi"))
    assert nf.value.body["type"] == "error"  # type: ignore[index]
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        ac.post("/v1/messages", cast_to=anthropic.types.Message,
                body={"model": "claude-sonnet", "messages": _user("hi")})
    assert "max_tokens" in bad.value.message


def test_untranslatable_requests_are_400_before_any_upstream_call(
    ac: anthropic.Anthropic, oc: openai.OpenAI, openai_upstream: tuple[UpstreamServer, UpstreamState],
    anthropic_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oc.chat.completions.create(model="claude-sonnet", n=2, messages=_user("hi"))
    assert info.value.param == "n"
    with pytest.raises(anthropic.BadRequestError) as bad:
        ac.messages.create(model="gpt-4o-mini", max_tokens=5, messages=_user("hi"),
                           tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "tools[0]" in bad.value.message
    assert openai_upstream[1].seen == [] and anthropic_upstream[1].seen == []


def test_upstream_429_on_messages(
    ac: anthropic.Anthropic, anthropic_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = anthropic_upstream
    state.faults.extend([{"status": 429, "retry_after": 1}] * 3)
    with pytest.raises(anthropic.RateLimitError) as info:
        ac.messages.create(model="claude-sonnet", max_tokens=5, messages=_user("hi"))
    assert info.value.response.headers["retry-after"] == "1"


def test_mid_stream_error_reaches_both_sdks(
    ac: anthropic.Anthropic, oc: openai.OpenAI, anthropic_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = anthropic_upstream
    state.faults.append({"error_event_after": 4})
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as a_err,
        ac.messages.stream(model="claude-sonnet", max_tokens=64, messages=_user("hi")) as s,
    ):
        got.extend(s.text_stream)
    assert got == ["Hello"]
    assert a_err.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "Overloaded" in a_err.value.body["error"]["message"]  # type: ignore[index]

    state.faults.append({"error_event_after": 4})
    with pytest.raises(openai.APIError) as o_err:
        list(oc.chat.completions.create(model="claude-sonnet", messages=_user("hi"), stream=True))
    assert "Overloaded" in o_err.value.message

    # A connection cut mid-stream ends the stream with an error event too.
    state.faults.append({"truncate_stream_after": 4})
    with pytest.raises(openai.APIError):
        list(oc.chat.completions.create(model="claude-sonnet", messages=_user("hi"), stream=True))


def test_translated_stream_usage_in_metrics(ac: anthropic.Anthropic, oc: openai.OpenAI, gw: GatewayProcess) -> None:
    list(oc.chat.completions.create(model="claude-sonnet", messages=_user("hi"), stream=True))
    with ac.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=_user("hi")) as s:
        s.until_done()
    metrics = httpx.get(gw.url + "/metrics", timeout=5).text

    def tokens(model: str, direction: str) -> float:
        m = re.search(rf'^hapax_tokens_total{{direction="{direction}",model="{model}",provider="\w+"}} (\S+)$',
                      metrics, re.M)
        assert m is not None, metrics
        return float(m.group(1))

    assert tokens("claude-sonnet", "input") == 12 and tokens("claude-sonnet", "output") == 3
    assert tokens("gpt-4o-mini", "input") == 10 and tokens("gpt-4o-mini", "output") == 3
