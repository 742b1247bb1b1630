"""Every request field a translation knows is carried to the upstream or refused with a 400.

docs/api.md promises that a request the target cannot express fails with a
400 naming the field rather than being silently changed. The table below
sends each known field (and a few unknown ones) through a running gateway to
an Anthropic, an OpenAI and a Gemini upstream, and checks either what the
upstream received or the 400's ``param``, with no upstream call. A coverage
test keeps the table in step with the translators' field lists.

Then, with the official SDKs: prompt caching and reasoning effort translated
both ways, cached tokens reported back, and provider headers (``anthropic-beta``,
``openai-beta``) forwarded on pass-through through an allowlist, never the
client's credentials.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from hapax._errors import ConfigError
from hapax._translate_fields import CHAT_NEUTRAL, REASONING_BUDGETS
from hapax._usage import Usage
from hapax.api._translate_anthropic import CHAT_TO_MESSAGES_FIELDS, MESSAGES_TO_CHAT_FIELDS
from hapax.config._config import parse_config
from hapax.providers._gemini import CHAT_FIELDS as GEMINI_FIELDS
from hapax.providers._gemini import chat_response, take_usage
from tests.gateway_process import GatewayProcess
from tests.upstreams import anthropic_api, gemini_api, openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

CLIENT_KEY = "client-secret-never-forwarded"
ANTHROPIC_KEY = "sk-ant-upstream-secret"
OPENAI_KEY = "sk-openai-upstream-secret"
GEMINI_KEY = "gm-upstream-secret"
FN: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
ANTHROPIC_TOOL: Any = {"name": "get_weather", "input_schema": FN["function"]["parameters"]}
USER: Any = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Ups:
    anthropic: UpstreamState
    openai: UpstreamState
    gemini: UpstreamState


def _start(tmp: Path) -> tuple[GatewayProcess, Ups, list[UpstreamServer]]:
    states = Ups(UpstreamState(), UpstreamState(), UpstreamState())
    a = UpstreamServer(anthropic_api.make_app(states.anthropic)).start()
    o = UpstreamServer(openai_api.make_app(states.openai)).start()
    g = UpstreamServer(gemini_api.make_app(states.gemini, api_key=GEMINI_KEY)).start()
    config = {
        "providers": {
            "ant": {"type": "anthropic", "base_url": a.url, "api_key": ANTHROPIC_KEY},
            "ant-traced": {"type": "anthropic", "base_url": a.url, "api_key": ANTHROPIC_KEY,
                           "forward_headers": ["anthropic-beta", "X-Trace-Tag"]},
            "ant-closed": {"type": "anthropic", "base_url": a.url, "api_key": ANTHROPIC_KEY,
                           "forward_headers": []},
            "oai": {"type": "openai", "base_url": o.url + "/v1", "api_key": OPENAI_KEY},
            "gm": {"type": "gemini", "base_url": g.url, "api_key": GEMINI_KEY},
        },
        # One attempt: these tests pin what reaches an upstream, not the retry policy.
        "reliability": {"retry": {"max_attempts": 1}},
        "models": [
            {"name": "claude", "provider": "ant", "model": "claude-up"},
            {"name": "claude-traced", "provider": "ant-traced", "model": "claude-up"},
            {"name": "claude-closed", "provider": "ant-closed", "model": "claude-up"},
            {"name": "gpt", "provider": "oai", "model": "gpt-up"},
            {"name": "flash", "provider": "gm", "model": "gemini-2.5-flash"},
        ],
    }
    return GatewayProcess(config, tmp).start(), states, [a, o, g]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Ups]]:
    gw, states, servers = _start(tmp_path_factory.mktemp("gw"))
    try:
        yield gw, states
    finally:
        gw.stop()
        for s in servers:
            s.stop()


# -- the table ---------------------------------------------------------------------------------

ABSENT = object()


@dataclass(frozen=True)
class Sent:
    """The upstream got ``value`` at ``path`` (dots into its body); ``ABSENT``: not sent."""

    path: str
    value: Any


@dataclass(frozen=True)
class Refused:
    """A 400 whose ``param`` is this, and no upstream call."""

    param: str


@dataclass(frozen=True)
class Row:
    field: str
    extra: dict[str, Any]
    expect: Sent | Refused


def _get(body: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(body, list):
            body = body[int(part)]
        elif isinstance(body, dict) and part in body:
            body = body[part]
        else:
            return ABSENT
    return body


WITH_TOOLS: Any = {"tools": [FN]}

#: OpenAI chat -> an Anthropic model.
CHAT_TO_ANTHROPIC = [
    Row("max_tokens", {"max_tokens": 50}, Sent("max_tokens", 50)),
    Row("max_completion_tokens", {"max_completion_tokens": 60}, Sent("max_tokens", 60)),
    Row("temperature", {"temperature": 1.5}, Sent("temperature", 1.0)),
    Row("top_p", {"top_p": 0.5}, Sent("top_p", 0.5)),
    Row("top_k", {"top_k": 7}, Sent("top_k", 7)),
    Row("stop", {"stop": "X"}, Sent("stop_sequences", ["X"])),
    Row("stream", {"stream": True}, Sent("stream", True)),
    Row("stream_options", {"stream": True, "stream_options": {"include_usage": True}},
        Sent("stream_options", ABSENT)),
    Row("user", {"user": "u1"}, Sent("metadata", {"user_id": "u1"})),
    Row("safety_identifier", {"safety_identifier": "s1"}, Sent("metadata", {"user_id": "s1"})),
    Row("tools", WITH_TOOLS, Sent("tools", [ANTHROPIC_TOOL])),
    Row("tool_choice", {**WITH_TOOLS, "tool_choice": "required"}, Sent("tool_choice", {"type": "any"})),
    Row("parallel_tool_calls", {**WITH_TOOLS, "parallel_tool_calls": False},
        Sent("tool_choice", {"type": "auto", "disable_parallel_tool_use": True})),
    Row("reasoning_effort", {"reasoning_effort": "high"},
        Sent("thinking", {"type": "enabled", "budget_tokens": REASONING_BUDGETS["high"]})),
    Row("reasoning_effort", {"reasoning_effort": "low", "max_tokens": 100},
        Sent("max_tokens", REASONING_BUDGETS["low"] + 100)),
    Row("reasoning_effort", {"reasoning_effort": "minimal", "max_tokens": 5000}, Sent("max_tokens", 5000)),
    Row("reasoning_effort", {"reasoning_effort": "none"}, Sent("thinking", ABSENT)),
    Row("reasoning_effort", {"reasoning_effort": "extreme"}, Refused("reasoning_effort")),
    Row("service_tier", {"service_tier": "default"}, Sent("service_tier", "standard_only")),
    Row("service_tier", {"service_tier": "flex"}, Refused("service_tier")),
    Row("metadata", {"metadata": {"k": "v"}}, Sent("metadata", ABSENT)),
    Row("prompt_cache_key", {"prompt_cache_key": "p"}, Sent("prompt_cache_key", ABSENT)),
    Row("n", {"n": 1}, Sent("n", ABSENT)),
    Row("n", {"n": 2}, Refused("n")),
    Row("presence_penalty", {"presence_penalty": 0}, Sent("presence_penalty", ABSENT)),
    Row("presence_penalty", {"presence_penalty": 0.5}, Refused("presence_penalty")),
    Row("frequency_penalty", {"frequency_penalty": 0.5}, Refused("frequency_penalty")),
    Row("logprobs", {"logprobs": False}, Sent("logprobs", ABSENT)),
    Row("logprobs", {"logprobs": True}, Refused("logprobs")),
    Row("top_logprobs", {"top_logprobs": 2}, Refused("top_logprobs")),
    Row("logit_bias", {"logit_bias": {"50256": -100}}, Refused("logit_bias")),
    Row("modalities", {"modalities": ["text", "audio"]}, Refused("modalities")),
    Row("response_format", {"response_format": {"type": "text"}}, Sent("response_format", ABSENT)),
    Row("response_format", {"response_format": {"type": "json_object"}}, Refused("response_format")),
    Row("store", {"store": True}, Refused("store")),
    Row("seed", {"seed": 1}, Refused("seed")),
    Row("audio", {"audio": {"voice": "alloy", "format": "mp3"}}, Refused("audio")),
    Row("prediction", {"prediction": {"type": "content", "content": "x"}}, Refused("prediction")),
    Row("web_search_options", {"web_search_options": {}}, Refused("web_search_options")),
    Row("functions", {"functions": [FN["function"]]}, Refused("functions")),
    Row("function_call", {"function_call": "auto"}, Refused("function_call")),
    Row("verbosity", {"verbosity": "low"}, Refused("verbosity")),
    Row("unknown", {"frobnicate": 1}, Refused("frobnicate")),
]

#: Anthropic messages -> an OpenAI model.
MESSAGES_TO_OPENAI = [
    Row("system", {"system": "be brief"}, Sent("messages.0", {"role": "system", "content": "be brief"})),
    Row("max_tokens", {}, Sent("max_tokens", 32)),
    Row("stop_sequences", {"stop_sequences": ["END"]}, Sent("stop", ["END"])),
    Row("stream", {"stream": True}, Sent("stream_options", {"include_usage": True})),
    Row("temperature", {"temperature": 0.3}, Sent("temperature", 0.3)),
    Row("top_p", {"top_p": 0.9}, Sent("top_p", 0.9)),
    Row("top_k", {"top_k": 5}, Sent("top_k", 5)),
    Row("metadata", {"metadata": {"user_id": "u9"}}, Sent("user", "u9")),
    Row("tools", {"tools": [ANTHROPIC_TOOL]}, Sent("tools", [FN])),
    Row("tool_choice", {"tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "any"}},
        Sent("tool_choice", "required")),
    Row("thinking", {"max_tokens": 3000, "thinking": {"type": "enabled", "budget_tokens": 2000}},
        Sent("reasoning_effort", "medium")),
    Row("thinking", {"thinking": {"type": "disabled"}}, Sent("reasoning_effort", ABSENT)),
    Row("thinking", {"thinking": {"type": "sometimes"}}, Refused("thinking")),
    Row("service_tier", {"service_tier": "standard_only"}, Sent("service_tier", "default")),
    Row("service_tier", {"service_tier": "priority"}, Refused("service_tier")),
    Row("container", {"container": "c1"}, Refused("container")),
    Row("mcp_servers", {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]},
        Refused("mcp_servers")),
    Row("context_management", {"context_management": {"edits": []}}, Refused("context_management")),
    Row("unknown", {"frobnicate": 1}, Refused("frobnicate")),
]

#: OpenAI chat -> a Gemini model (what Gemini gets is a GenerateContentRequest).
CHAT_TO_GEMINI = [
    Row("max_tokens", {"max_tokens": 50}, Sent("generationConfig.maxOutputTokens", 50)),
    Row("max_completion_tokens", {"max_completion_tokens": 60}, Sent("generationConfig.maxOutputTokens", 60)),
    Row("temperature", {"temperature": 1.5}, Sent("generationConfig.temperature", 1.5)),
    Row("top_p", {"top_p": 0.5}, Sent("generationConfig.topP", 0.5)),
    Row("top_k", {"top_k": 7}, Sent("generationConfig.topK", 7)),
    Row("n", {"n": 1}, Sent("generationConfig.candidateCount", 1)),
    Row("presence_penalty", {"presence_penalty": 0.5}, Sent("generationConfig.presencePenalty", 0.5)),
    Row("frequency_penalty", {"frequency_penalty": 0.5}, Sent("generationConfig.frequencyPenalty", 0.5)),
    Row("seed", {"seed": 3}, Sent("generationConfig.seed", 3)),
    Row("stop", {"stop": ["X"]}, Sent("generationConfig.stopSequences", ["X"])),
    Row("stream", {"stream": True}, Sent("contents.0.role", "user")),
    Row("stream_options", {"stream": True, "stream_options": {"include_usage": True}},
        Sent("contents.0.role", "user")),
    Row("response_format", {"response_format": {"type": "json_object"}},
        Sent("generationConfig.responseMimeType", "application/json")),
    Row("response_format", {"response_format": {"type": "xml"}}, Refused("response_format")),
    Row("reasoning_effort", {"reasoning_effort": "medium"},
        Sent("generationConfig.thinkingConfig", {"thinkingBudget": REASONING_BUDGETS["medium"]})),
    Row("reasoning_effort", {"reasoning_effort": "none"},
        Sent("generationConfig.thinkingConfig", {"thinkingBudget": 0})),
    Row("tools", WITH_TOOLS, Sent("tools.0.functionDeclarations.0.name", "get_weather")),
    Row("tools", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, Refused("tools[0]")),
    Row("tool_choice", {**WITH_TOOLS, "tool_choice": "required"},
        Sent("toolConfig.functionCallingConfig", {"mode": "ANY"})),
    Row("tool_choice", {**WITH_TOOLS, "tool_choice": {"type": "allowed_tools"}}, Refused("tool_choice")),
    Row("user", {"user": "u1"}, Sent("user", ABSENT)),
    Row("safety_identifier", {"safety_identifier": "s1"}, Sent("safety_identifier", ABSENT)),
    Row("metadata", {"metadata": {"k": "v"}}, Sent("metadata", ABSENT)),
    Row("prompt_cache_key", {"prompt_cache_key": "p"}, Sent("prompt_cache_key", ABSENT)),
    Row("parallel_tool_calls", {**WITH_TOOLS, "parallel_tool_calls": False}, Refused("parallel_tool_calls")),
    Row("logprobs", {"logprobs": True}, Refused("logprobs")),
    Row("top_logprobs", {"top_logprobs": 2}, Refused("top_logprobs")),
    Row("logit_bias", {"logit_bias": {"1": 1}}, Refused("logit_bias")),
    Row("modalities", {"modalities": ["audio"]}, Refused("modalities")),
    Row("store", {"store": True}, Refused("store")),
    Row("service_tier", {"service_tier": "flex"}, Refused("service_tier")),
    Row("audio", {"audio": {"voice": "alloy"}}, Refused("audio")),
    Row("unknown", {"frobnicate": 1}, Refused("frobnicate")),
]

#: Legacy completions -> chat -> an Anthropic model.
COMPLETIONS_TO_ANTHROPIC = [
    Row("max_tokens", {"max_tokens": 20}, Sent("max_tokens", 20)),
    Row("best_of", {"best_of": 1}, Sent("best_of", ABSENT)),
    Row("best_of", {"best_of": 3}, Refused("best_of")),
    Row("echo", {"echo": True}, Refused("echo")),
    Row("seed", {"seed": 1}, Refused("seed")),
    Row("unknown", {"frobnicate": 1}, Refused("frobnicate")),
]

CASES = (
    [("/v1/chat/completions", "claude", "anthropic", r) for r in CHAT_TO_ANTHROPIC]
    + [("/v1/messages", "gpt", "openai", r) for r in MESSAGES_TO_OPENAI]
    + [("/v1/chat/completions", "flash", "gemini", r) for r in CHAT_TO_GEMINI]
    + [("/v1/completions", "claude", "anthropic", r) for r in COMPLETIONS_TO_ANTHROPIC]
)


def _base(path: str, model: str) -> dict[str, Any]:
    if path == "/v1/messages":
        return {"model": model, "max_tokens": 32, "messages": USER}
    if path == "/v1/completions":
        return {"model": model, "prompt": "hi"}
    return {"model": model, "messages": USER}


@pytest.mark.parametrize(("path", "model", "upstream", "row"), CASES,
                         ids=[f"{m}-{r.field}-{i}" for i, (_, m, _, r) in enumerate(CASES)])
def test_each_field_is_translated_or_refused(
    env: tuple[GatewayProcess, Ups], path: str, model: str, upstream: str, row: Row
) -> None:
    gw, ups = env
    state: UpstreamState = getattr(ups, upstream)
    before = len(state.seen)
    r = httpx.post(gw.url + path, json={**_base(path, model), **row.extra},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=20)
    if isinstance(row.expect, Refused):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        if path == "/v1/messages":
            assert err["type"] == "invalid_request_error" and row.expect.param in err["message"]
        else:
            assert err["param"] == row.expect.param and err["code"] in ("unsupported_parameter", "invalid_value")
        assert len(state.seen) == before, "a refused request must not reach the upstream"
        return
    assert r.status_code == 200, r.text
    sent = state.seen[-1].body
    assert _get(sent, row.expect.path) == row.expect.value, sent


def test_the_table_covers_every_field_the_translators_know() -> None:
    """Adding a field to a translator without a row here fails (and the other way round)."""
    base = {"model", "messages"}

    def fields(rows: list[Row]) -> set[str]:
        return {r.field for r in rows} - {"unknown"}

    assert fields(CHAT_TO_ANTHROPIC) >= (CHAT_TO_MESSAGES_FIELDS | set(CHAT_NEUTRAL)) - base
    assert fields(MESSAGES_TO_OPENAI) >= MESSAGES_TO_CHAT_FIELDS - base - {"model"}
    assert fields(CHAT_TO_GEMINI) >= (GEMINI_FIELDS | set(CHAT_NEUTRAL)) - base


# -- prompt caching and reasoning, with the SDKs ------------------------------------------------


@pytest.fixture
def oc(env: tuple[GatewayProcess, Ups]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=env[0].url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
def ac(env: tuple[GatewayProcess, Ups]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=env[0].url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as c:
        yield c


EPHEMERAL: Any = {"type": "ephemeral"}
CACHED_CHAT: Any = [
    {"role": "system", "content": [{"type": "text", "text": "long rules", "cache_control": EPHEMERAL}]},
    {"role": "user", "content": [{"type": "text", "text": "long document",
                                  "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                                 {"type": "text", "text": "question?"}]},
]


def test_openai_sdk_cache_control_and_reasoning_reach_anthropic(
    oc: openai.OpenAI, env: tuple[GatewayProcess, Ups]
) -> None:
    state = env[1].anthropic
    tools: Any = [{**FN, "cache_control": EPHEMERAL}]
    r = oc.chat.completions.create(
        model="claude", messages=CACHED_CHAT, reasoning_effort="medium", tools=tools, tool_choice="none")
    sent = state.seen[-1].body
    assert sent["system"] == [{"type": "text", "text": "long rules", "cache_control": EPHEMERAL}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "long document", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "question?"},
    ]
    assert sent["tools"] == [{**ANTHROPIC_TOOL, "cache_control": EPHEMERAL}]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": REASONING_BUDGETS["medium"]}
    assert sent["max_tokens"] > REASONING_BUDGETS["medium"]  # the upstream enforces it, too
    # The thinking block is not the answer; cache reads come back where OpenAI puts them.
    assert r.choices[0].message.content == "Hello from upstream!"
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == anthropic_api.CACHED_TOKENS
    assert r.usage.prompt_tokens == anthropic_api.INPUT_TOKENS + anthropic_api.CACHED_TOKENS

    chunks = list(oc.chat.completions.create(
        model="claude", messages=CACHED_CHAT, reasoning_effort="low", stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from upstream!"
    final = chunks[-1].usage
    assert final is not None and final.prompt_tokens_details is not None
    assert final.prompt_tokens_details.cached_tokens == anthropic_api.CACHED_TOKENS
    assert state.seen[-1].body["thinking"]["budget_tokens"] == REASONING_BUDGETS["low"]


def test_message_level_cache_control_marks_the_last_block(oc: openai.OpenAI, env: tuple[GatewayProcess, Ups]) -> None:
    state = env[1].anthropic
    marked: Any = [{"role": "user", "content": "a long prompt", "cache_control": EPHEMERAL}]
    oc.chat.completions.create(model="claude", messages=marked)
    assert state.seen[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "a long prompt", "cache_control": EPHEMERAL}]
    bad_marker: Any = [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "forever"}}]}]
    with pytest.raises(openai.BadRequestError) as bad:
        oc.chat.completions.create(model="claude", messages=bad_marker)
    assert bad.value.param == "messages[0].content[0].cache_control"


def test_anthropic_sdk_thinking_reaches_openai_as_reasoning_effort(
    ac: anthropic.Anthropic, env: tuple[GatewayProcess, Ups]
) -> None:
    state = env[1].openai
    m = ac.messages.create(
        model="gpt", max_tokens=30000, thinking={"type": "enabled", "budget_tokens": 20000},
        system=[{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
    )
    assert m.content[0].type == "text"
    sent = state.seen[-1].body
    assert sent["reasoning_effort"] == "high"
    # OpenAI caches prefixes by itself: the markers are accepted and not sent.
    assert "cache_control" not in str(sent)
    assert sent["messages"] == [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}]


def test_gemini_gets_a_thinking_budget_and_no_cache_markers(
    oc: openai.OpenAI, env: tuple[GatewayProcess, Ups]
) -> None:
    state = env[1].gemini
    r = oc.chat.completions.create(model="flash", messages=CACHED_CHAT, reasoning_effort="high")
    assert r.choices[0].message.content
    sent = state.seen[-1].body
    # The Gemini upstream refuses unknown keys as Google does, so cache_control never got there.
    assert sent["generationConfig"]["thinkingConfig"] == {"thinkingBudget": REASONING_BUDGETS["high"]}
    assert sent["systemInstruction"] == {"parts": [{"text": "long rules"}]}


# -- headers -----------------------------------------------------------------------------------


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_anthropic_beta_reaches_anthropic_on_pass_through(
    ac: anthropic.Anthropic, env: tuple[GatewayProcess, Ups]
) -> None:
    state = env[1].anthropic
    beta = "prompt-caching-2024-07-31,context-1m-2025-08-07"
    ac.messages.create(model="claude", max_tokens=16, messages=USER, extra_headers={
        "anthropic-beta": beta, "authorization": f"Bearer {CLIENT_KEY}-2", "cookie": "session=s3cret",
        "x-trace-tag": "t1"})
    seen = _lower(state.seen[-1].headers)
    assert seen["anthropic-beta"] == beta
    assert seen["x-api-key"] == ANTHROPIC_KEY
    assert CLIENT_KEY not in str(seen) and "s3cret" not in str(seen)
    assert "authorization" not in seen and "x-trace-tag" not in seen  # not on the default allowlist

    # A provider's own allowlist: the names it lists, matched case-insensitively.
    ac.messages.create(model="claude-traced", max_tokens=16, messages=USER,
                       extra_headers={"X-Trace-Tag": "t2", "anthropic-beta": beta})
    seen = _lower(state.seen[-1].headers)
    assert (seen["x-trace-tag"], seen["anthropic-beta"], seen["x-api-key"]) == ("t2", beta, ANTHROPIC_KEY)

    # The OpenAI SDK talking to a Claude model (translated) may ask for a beta too.
    with openai.OpenAI(base_url=env[0].url + "/v1", api_key=CLIENT_KEY, max_retries=0) as oc:
        oc.chat.completions.create(model="claude", messages=USER, extra_headers={"anthropic-beta": beta})
    assert _lower(state.seen[-1].headers)["anthropic-beta"] == beta


def test_openai_beta_reaches_openai_and_never_the_clients_key(
    oc: openai.OpenAI, env: tuple[GatewayProcess, Ups]
) -> None:
    state = env[1].openai
    oc.chat.completions.create(model="gpt", messages=USER, extra_headers={
        "OpenAI-Beta": "assistants=v2", "x-api-key": CLIENT_KEY, "OpenAI-Organization": "org-client"})
    seen = _lower(state.seen[-1].headers)
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in seen and "openai-organization" not in seen
    assert CLIENT_KEY not in str(seen)


def test_a_beta_header_no_upstream_would_get_is_refused(
    ac: anthropic.Anthropic, oc: openai.OpenAI, env: tuple[GatewayProcess, Ups]
) -> None:
    ups = env[1]
    before = (len(ups.openai.seen), len(ups.anthropic.seen), len(ups.gemini.seen))
    with pytest.raises(anthropic.BadRequestError) as bad:
        ac.messages.create(model="gpt", max_tokens=16, messages=USER,
                           extra_headers={"anthropic-beta": "context-1m-2025-08-07"})
    assert "anthropic-beta" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad2:
        oc.chat.completions.create(model="flash", messages=USER, extra_headers={"openai-beta": "x=1"})
    assert bad2.value.param == "openai-beta"
    with pytest.raises(openai.BadRequestError) as bad3:  # the operator turned forwarding off
        oc.chat.completions.create(model="claude-closed", messages=USER,
                                   extra_headers={"anthropic-beta": "context-1m-2025-08-07"})
    assert bad3.value.param == "anthropic-beta"
    assert (len(ups.openai.seen), len(ups.anthropic.seen), len(ups.gemini.seen)) == before


@pytest.mark.parametrize("name", ["authorization", "X-Api-Key", "api-key", "x-goog-api-key", "cookie",
                                  "host", "connection", "content-length", "proxy-authorization"])
def test_credentials_and_hop_by_hop_headers_cannot_be_allowlisted(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"p": {"type": "anthropic", "forward_headers": [name]}}})
    assert "forward_headers" in str(info.value) and "cannot be forwarded" in str(info.value)


def test_gemini_cached_tokens_reach_openai_usage() -> None:
    """Gemini's implicit cache hits are reported where OpenAI clients read cached tokens."""
    usage = Usage()
    take_usage(usage, {"promptTokenCount": 100, "candidatesTokenCount": 5, "cachedContentTokenCount": 64})
    body = chat_response({"candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}]},
                         model="m", response_id="r", created=0, usage=usage)
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                             "prompt_tokens_details": {"cached_tokens": 64}}
