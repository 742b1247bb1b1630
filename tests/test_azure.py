"""Azure OpenAI behind the gateway: deployment URLs, api-version, the api-key header.

The official openai SDK talks to a real gateway process; the upstream is the
OpenAI test app mounted as Azure serves it (``make_azure_app``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from hapax.providers._azure import DEFAULT_API_VERSION
from tests.gateway_process import GatewayProcess
from tests.upstreams import openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

KEY = "az-upstream-secret"
Upstream = tuple[UpstreamServer, UpstreamState]


@pytest.fixture
def azure_upstream() -> Iterator[Upstream]:
    state = UpstreamState()
    server = UpstreamServer(openai_api.make_azure_app(state)).start()
    try:
        yield server, state
    finally:
        server.stop()


def _config(url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": {"az": {"type": "azure-openai", "base_url": url, "api_key": KEY, **provider}},
        # One attempt: these tests pin how an upstream answer maps, not the retry policy.
        "reliability": {"retry": {"max_attempts": 1}},
        "models": [
            {"name": "gpt-4o", "provider": "az", "model": "prod-gpt4o"},
            {"name": "embed", "provider": "az", "model": "prod-embed"},
            {"name": "instruct", "provider": "az", "model": "prod-instruct"},
        ],
    }


@pytest.fixture
def gw(gateway: Callable[..., GatewayProcess], azure_upstream: Upstream) -> GatewayProcess:
    return gateway(_config(azure_upstream[0].url))


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=20) as c:
        yield c


def test_chat_goes_to_the_deployment_url_with_api_key(client: openai.OpenAI, azure_upstream: Upstream) -> None:
    _, state = azure_upstream
    r = client.chat.completions.create(model="gpt-4o", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from upstream!"
    assert r.usage is not None and r.usage.prompt_tokens == 10
    seen = state.seen[-1]
    assert seen.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert seen.query == {"api-version": DEFAULT_API_VERSION}
    assert seen.headers["api-key"] == KEY
    # The client's credential never goes upstream, and Azure's key is not sent as a bearer.
    assert "Authorization" not in seen.headers
    assert seen.body["messages"][0] == {"role": "system", "content": "be brief"}


def test_configured_api_version_and_entra_header(
    gateway: Callable[..., GatewayProcess], azure_upstream: Upstream
) -> None:
    server, state = azure_upstream
    cfg = _config(server.url + "/", api_version="2025-01-01-preview",
                  headers={"authorization": "Bearer entra-token"})
    del cfg["providers"]["az"]["api_key"]
    gw = gateway(cfg)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=20) as client:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    seen = state.seen[-1]
    assert seen.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert seen.query == {"api-version": "2025-01-01-preview"}
    assert seen.headers["Authorization"] == "Bearer entra-token"
    assert "api-key" not in seen.headers


def test_streaming_with_and_without_usage(client: openai.OpenAI, azure_upstream: Upstream) -> None:
    _, state = azure_upstream
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from upstream!"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3

    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    seen = state.seen[-1]
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.query == {"api-version": DEFAULT_API_VERSION}


def test_streamed_tool_call_then_tool_result(client: openai.OpenAI, azure_upstream: Upstream) -> None:
    _, state = azure_upstream
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for c in client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True
    ):
        for tc in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "args": ""})
            slot["id"] += tc.id or ""
            assert tc.function is not None
            slot["name"] += tc.function.name or ""
            slot["args"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_up1", "name": "get_weather", "args": '{"city": "Paris"}'}}

    messages: Any = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_up1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_up1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model="gpt-4o", messages=messages)
    assert r.choices[0].message.content == "Hello from upstream!"
    assert state.seen[-1].body["messages"] == messages


def test_completions_and_embeddings(client: openai.OpenAI, azure_upstream: Upstream) -> None:
    _, state = azure_upstream
    assert client.completions.create(model="instruct", prompt="Say hi").choices[0].text == "Hello from upstream!"
    assert state.seen[-1].path == "/openai/deployments/prod-instruct/completions"

    r = client.embeddings.create(model="embed", input=["a", "b"])  # the SDK asks for base64
    assert r.data[1].embedding == pytest.approx([0.2, 0.2, 0.3])
    assert state.seen[-1].body["encoding_format"] == "base64"
    r = client.embeddings.create(model="embed", input="a", encoding_format="float")
    assert r.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])
    seen = state.seen[-1]
    assert seen.path == "/openai/deployments/prod-embed/embeddings"
    assert seen.query == {"api-version": DEFAULT_API_VERSION}
    assert seen.headers["api-key"] == KEY


@pytest.mark.parametrize(
    ("fault", "exc", "status", "code"),
    [
        ({"status": 400}, openai.BadRequestError, 400, "upstream_bad_request"),
        ({"status": 429, "retry_after": 3}, openai.RateLimitError, 429, "upstream_rate_limited"),
        ({"status": 500}, openai.InternalServerError, 502, "upstream_unavailable"),
    ],
)
def test_upstream_errors_reach_the_client(
    client: openai.OpenAI, azure_upstream: Upstream, fault: dict[str, Any], exc: type[openai.APIStatusError],
    status: int, code: str,
) -> None:
    _, state = azure_upstream
    state.faults.append(fault)
    with pytest.raises(exc) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == status
    assert err.code == code
    body: Any = err.body
    assert "scripted" in body["message"] and body["request_id"].startswith("req_")
    if status == 429:
        assert err.response.headers["retry-after"] == "3"


def test_usage_is_counted_in_metrics(client: openai.OpenAI, gw: GatewayProcess) -> None:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True))
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search(r'hapax_tokens_total\{direction="input",model="gpt-4o",provider="az"\} (\d+)', text)
    assert m is not None and int(m.group(1)) == 20
    m = re.search(r'hapax_tokens_total\{direction="output",model="gpt-4o",provider="az"\} (\d+)', text)
    assert m is not None and int(m.group(1)) == 6
