"""Failover crosses provider families, translating as it goes (OpenAI <-> Anthropic)."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import openai

from tests.gateway_process import GatewayProcess
from tests.reliability_support import chats, metric
from tests.upstreams.server import UpstreamServer, UpstreamState

Up = tuple[UpstreamServer, UpstreamState]


def _config(openai_and_anthropic: tuple[Up, Up], first: str) -> dict[str, object]:
    (oa, _), (an, _) = openai_and_anthropic
    order = ["oai", "ant"] if first == "oai" else ["ant", "oai"]
    return {
        "providers": {
            "oai": {"type": "openai", "base_url": oa.url + "/v1", "api_key": "sk-o"},
            "ant": {"type": "anthropic", "base_url": an.url, "api_key": "sk-a"},
        },
        "models": [{"name": "m", "strategy": "failover", "deployments": [
            {"provider": p, "model": f"{p}-model", "priority": i} for i, p in enumerate(order)]}],
        "reliability": {"retry": {"backoff_base": 0.01, "backoff_max": 0.02}},
    }


def test_openai_failing_fails_over_to_anthropic_for_an_openai_client(
    gateway: Callable[..., GatewayProcess], openai_and_anthropic: tuple[Up, Up]
) -> None:
    (_, o), (_, a) = openai_and_anthropic
    gw = gateway(_config(openai_and_anthropic, first="oai"))
    o.always = {"status": 503}
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        r = raw.parse()
        assert raw.headers["x-hapax-provider"] == "ant"
        assert int(raw.headers["x-hapax-attempts"]) == 2
        assert r.choices[0].message.content and r.usage is not None
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
    assert text == r.choices[0].message.content
    # The Anthropic upstream got a translated Messages request with its own key.
    sent = a.seen[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == "sk-a"
    assert sent.body["model"] == "ant-model" and sent.body["max_tokens"] > 0
    assert chats(o.seen) >= 2
    assert metric(gw.url, "hapax_failovers_total", model="m") >= 2


def test_anthropic_failing_fails_over_to_openai_for_an_anthropic_client(
    gateway: Callable[..., GatewayProcess], openai_and_anthropic: tuple[Up, Up]
) -> None:
    (_, o), (_, a) = openai_and_anthropic
    gw = gateway(_config(openai_and_anthropic, first="ant"))
    a.always = {"status": 529}
    with anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0) as client:
        msg = client.messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].type == "text" and msg.content[0].text == "Hello from upstream!"
        with client.messages.stream(model="m", max_tokens=50,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            assert "".join(stream.text_stream) == "Hello from upstream!"
    # The OpenAI upstream got a translated chat request.
    sent = o.seen[-1]
    assert sent.path == "/v1/chat/completions" and sent.body["model"] == "oai-model"
    assert sent.body["messages"] == [{"role": "user", "content": "hi"}]
