"""The official openai SDK, pointed at a running gateway, works unmodified."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from tests.gateway_process import GatewayProcess
from tests.upstreams.server import UpstreamServer, UpstreamState


def _config(upstream_url: str) -> dict[str, object]:
    return {
        "providers": {
            "up": {"type": "openai", "base_url": upstream_url + "/v1", "api_key": "sk-upstream-secret"},
            "demo": {"type": "mock"},
        },
        "models": [
            {"name": "gpt-4o-mini", "provider": "up", "aliases": ["mini"]},
            {"name": "text-embedding-3-small", "provider": "up"},
            {"name": "gpt-3.5-turbo-instruct", "provider": "up"},
            {"name": "demo", "provider": "demo"},
        ],
    }


@pytest.fixture
def client(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> Iterator[openai.OpenAI]:
    server, _ = openai_upstream
    gw = gateway(_config(server.url))
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0) as c:
        yield c


def test_chat_non_streaming(client: openai.OpenAI, openai_upstream: tuple[UpstreamServer, UpstreamState]) -> None:
    _, state = openai_upstream
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from upstream!"
    assert r.usage is not None and r.usage.prompt_tokens == 10
    seen = state.seen[-1]
    # The gateway's credential goes upstream, never the client's.
    assert seen.headers["Authorization"] == "Bearer sk-upstream-secret"


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from upstream!"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_stream_without_usage_hides_usage_chunk(
    client: openai.OpenAI, openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = openai_upstream
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ... while the gateway still asked the upstream for usage, to count tokens.
    assert state.seen[-1].body["stream_options"] == {"include_usage": True}


def test_tools_and_extra_fields_pass_through(
    client: openai.OpenAI, openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    _, state = openai_upstream
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        tools=tools, response_format={"type": "json_object"},
        extra_body={"some_new_param": {"x": 1}},
    )
    call = r.choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "get_weather"
    sent = state.seen[-1].body
    assert sent["tools"] == tools
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["some_new_param"] == {"x": 1}
    assert sent["messages"][0]["content"][1]["type"] == "image_url"


def test_streaming_tool_call(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    args = ""
    for c in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True
    ):
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            args += tc.function.arguments or "" if tc.function else ""
    assert args == '{"city": "Paris"}'


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert r.choices[0].text == "Hello from upstream!"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True) if c.choices)
    assert text.strip() == "Hello from upstream!"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(r.data) == 2
    assert r.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])
    r = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert r.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-4o-mini", "mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct", "demo"]
    assert client.models.retrieve("mini").id == "mini"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unknown_model_is_404_with_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert info.value.body["request_id"].startswith("req_")  # type: ignore[index]


def test_mock_provider_through_sdk(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "ping"}])
    assert r.choices[0].message.content == "Hello from Hapax! You said: ping"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "ping"}], stream=True) if c.choices)
    assert text == "Hello from Hapax! You said: ping"
    e = client.embeddings.create(model="demo", input="x")
    assert len(e.data[0].embedding) == 8
