"""What a response says about where it went: cost, diagnostics, model names, model lists.

Every test runs a real gateway in front of the scripted OpenAI/Anthropic
upstreams and looks only at what a client or an operator sees: headers,
bodies, ``/admin/usage``, ``/v1/models``, the access log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.gateway_process import ROOT, GatewayProcess
from tests.reliability_support import Ups, chat
from tests.upstreams.server import UpstreamServer, UpstreamState, free_port

Up = tuple[UpstreamServer, UpstreamState]

ADMIN_KEY = "hpx_admin_" + "R" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
#: The default list price of claude-sonnet-4, USD per million tokens (input, output).
CLAUDE = (3.00, 15.00)
#: What the config below prices the self-hosted model at.
LLAMA = (1.00, 2.00)


def _two_deployments(ab: Ups, **extra: Any) -> dict[str, Any]:
    """One public model, ``smart``: a self-hosted llama first, Claude (by list price) second."""
    (a, _), (b, _) = ab
    cfg: dict[str, Any] = {
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}"},
        "providers": {
            "up1": {"type": "openai", "base_url": a.url + "/v1", "api_key": "k1"},
            "up2": {"type": "openai", "base_url": b.url + "/v1", "api_key": "k2"},
        },
        "models": [{"name": "smart", "strategy": "failover", "deployments": [
            {"provider": "up1", "model": "llama-3-70b", "priority": 0},
            {"provider": "up2", "model": "claude-sonnet-4", "priority": 1},
        ]}],
        "pricing": {"llama-3-70b": {"input": LLAMA[0], "output": LLAMA[1]}},
        "reliability": {"retry": {"backoff_base": 0.01, "backoff_max": 0.02}},
    }
    cfg.update(extra)
    return cfg


def _key(gw: GatewayProcess, **spec: Any) -> str:
    r = httpx.post(gw.url + "/admin/keys", headers=ADMIN, json={"name": "k", **spec}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def _cost(price: tuple[float, float], usage: dict[str, int]) -> str:
    return f"{(usage['prompt_tokens'] * price[0] + usage['completion_tokens'] * price[1]) / 1_000_000:.8f}"


def _access_line(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The access-log entry of one request, waiting (bounded) for it to be written."""
    deadline = time.monotonic() + 5
    while True:
        for ln in gw.logs().splitlines():
            if request_id in ln and ln.startswith("{"):
                entry: dict[str, Any] = json.loads(ln)
                if entry.get("request_id") == request_id and "latency_ms" in entry:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for {request_id}")
        time.sleep(0.05)


# -- 1. cost follows the deployment that answered ------------------------------------------


def test_cost_is_priced_by_the_deployment_that_answered(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_two_deployments(ab), env=ENV)
    key = _key(gw, name="billing-check")
    auth = {"authorization": f"Bearer {key}"}

    r = chat(gw.url, model="smart", headers=auth)
    assert r.status_code == 200 and r.headers["x-hapax-deployment"] == "up1/llama-3-70b"
    assert r.headers["x-hapax-cost-usd"] == _cost(LLAMA, r.json()["usage"])

    a.always = {"status": 503}  # now Claude answers, at Claude's price
    r2 = chat(gw.url, model="smart", headers=auth)
    assert r2.status_code == 200 and r2.headers["x-hapax-deployment"] == "up2/claude-sonnet-4"
    assert r2.headers["x-hapax-cost-usd"] == _cost(CLAUDE, r2.json()["usage"])

    # Usage rows say which deployment answered, in JSON and in CSV.
    usage = httpx.get(gw.url + "/admin/usage?model=smart", headers=ADMIN, timeout=10).json()
    by_dep = {row["deployment"]: row for row in usage["data"]}
    assert set(by_dep) == {"up1/llama-3-70b", "up2/claude-sonnet-4"}
    assert f"{by_dep['up1/llama-3-70b']['cost_usd']:.8f}" == r.headers["x-hapax-cost-usd"]
    assert f"{by_dep['up2/claude-sonnet-4']['cost_usd']:.8f}" == r2.headers["x-hapax-cost-usd"]
    only = httpx.get(gw.url + "/admin/usage?deployment=up1/llama-3-70b", headers=ADMIN, timeout=10).json()
    assert [row["deployment"] for row in only["data"]] == ["up1/llama-3-70b"]
    csv = httpx.get(gw.url + "/admin/usage?format=csv", headers=ADMIN, timeout=10).text.splitlines()
    assert csv[0].startswith("day,key,team,model,deployment,requests")
    assert any(",smart,up2/claude-sonnet-4," in line for line in csv[1:])

    # The access line names the key, the deployment, the attempts and whether it streamed.
    entry = _access_line(gw, r2.headers["x-request-id"])
    assert entry["key_name"] == "billing-check" and entry["deployment"] == "up2/claude-sonnet-4"
    assert entry["attempts"] == 2 and entry["stream"] is False


def test_budget_reservation_assumes_the_dearest_deployment(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    gw = gateway(_two_deployments(ab), env=ENV)
    # 100 output tokens: $0.0002 on llama, $0.0015 on Claude. Either may answer, so the
    # budget must hold the dearer one: a $0.001 budget cannot admit the call.
    def call(key: str) -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions", timeout=10, headers={"authorization": f"Bearer {key}"},
                          json={"model": "smart", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})

    r = call(_key(gw, budget={"daily_usd": 0.001}))
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "insufficient_quota"
    ok = call(_key(gw, budget={"daily_usd": 0.01}))
    assert ok.status_code == 200 and ok.headers["x-hapax-deployment"] == "up1/llama-3-70b"


# -- 2. a failed request says what it tried ------------------------------------------------


def test_a_failed_request_says_every_deployment_tried_and_why(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), (_, b) = ab
    cfg = _two_deployments(ab, auth={"mode": "none"})
    cfg["providers"]["up2"]["timeouts"] = {"first_byte": 0.3}
    cfg["reliability"]["circuit_breaker"] = {"consecutive_failures": 50}
    gw = gateway(cfg)
    a.always = {"status": 503}
    b.always = {"hang": 3}

    r = chat(gw.url, model="smart")
    assert r.status_code == 502
    assert r.headers["x-hapax-attempts"] == "3"
    assert r.headers["x-hapax-deployment"] == "up1/llama-3-70b"  # the last one tried
    assert r.headers["x-hapax-provider"] == "up1"
    assert r.headers["x-hapax-attempted"] == (
        "up1/llama-3-70b=upstream_unavailable, up2/claude-sonnet-4=upstream_timeout, "
        "up1/llama-3-70b=upstream_unavailable"
    )
    upstream_ms = float(r.headers["server-timing"].split("upstream;dur=")[1])
    assert upstream_ms > 0
    err = r.json()["error"]
    # OpenAI's fields stay as they are; the attempts are one more field beside them.
    assert err["code"] == "upstream_unavailable" and err["type"] == "api_error" and "message" in err
    assert err["attempts"] == [
        {"deployment": "up1/llama-3-70b", "code": "upstream_unavailable", "status": 502},
        {"deployment": "up2/claude-sonnet-4", "code": "upstream_timeout", "status": 504},
        {"deployment": "up1/llama-3-70b", "code": "upstream_unavailable", "status": 502},
    ]
    entry = _access_line(gw, r.headers["x-request-id"])
    assert entry["status"] == 502 and entry["deployment"] == "up1/llama-3-70b"
    assert entry["attempts"] == 3 and entry["stream"] is False and entry["error_code"] == "upstream_unavailable"

    # The openai SDK sees the same, and so does a streamed call on the Anthropic route.
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client, pytest.raises(
        openai.InternalServerError
    ) as failed:
        client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.response.headers["x-hapax-attempts"] == "3"
    m = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "smart", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert m.status_code == 502 and m.json()["type"] == "error"
    assert [t["code"] for t in m.json()["error"]["attempts"]][:2] == ["upstream_unavailable", "upstream_timeout"]
    streamed = _access_line(gw, m.headers["x-request-id"])
    assert streamed["stream"] is True and streamed["attempts"] == 3


# -- 5. aliases are listed ----------------------------------------------------------------


def test_models_list_includes_aliases(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway({"providers": {"mock": {"type": "mock"}},
                  "models": [{"name": "big", "provider": "mock", "aliases": ["large", "huge"]},
                             {"name": "small", "provider": "mock"}]})
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        listed = [m.id for m in client.models.list()]
        assert listed == ["big", "large", "huge", "small"]
        for name in listed:  # every listed name resolves
            assert client.models.retrieve(name).id == name


# -- 4. responses name the model the client asked for --------------------------------------


def _naming_config(ups: tuple[Up, Up]) -> dict[str, Any]:
    (oa, _), (an, _) = ups
    return {
        "providers": {
            "oai": {"type": "openai", "base_url": oa.url + "/v1", "api_key": "k"},
            "ant": {"type": "anthropic", "base_url": an.url, "api_key": "k"},
            "mock": {"type": "mock"},
        },
        "models": [
            {"name": "gpt-public", "aliases": ["mini"], "provider": "oai", "model": "up-model"},
            {"name": "claude-public", "provider": "ant", "model": "claude-up"},
            {"name": "embed-public", "provider": "oai", "model": "up-embed"},
            {"name": "mock-public", "provider": "mock", "model": "mock-up"},
            {"name": "raw", "provider": "oai", "model": "up-raw", "response_model": "upstream"},
        ],
    }


def _sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]


def test_openai_responses_name_the_public_model(
    gateway: Callable[..., GatewayProcess], openai_and_anthropic: tuple[Up, Up]
) -> None:
    gw = gateway(_naming_config(openai_and_anthropic))
    msgs: Any = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        for asked in ("gpt-public", "mini", "claude-public", "mock-public"):  # pass-through and translated
            raw = client.chat.completions.with_raw_response.create(model=asked, messages=msgs)
            assert raw.parse().model == asked
            assert raw.headers["x-hapax-upstream-model"] in ("up-model", "claude-up", "mock-up")
            chunks = list(client.chat.completions.create(
                model=asked, messages=msgs, stream=True, stream_options={"include_usage": True}))
            assert len(chunks) > 2 and {c.model for c in chunks} == {asked}, asked
        assert client.embeddings.create(model="embed-public", input="hi").model == "embed-public"
        assert client.completions.create(model="gpt-public", prompt="hi").model == "gpt-public"

        # response_model: upstream passes the upstream's name through, in JSON and in streams.
        assert client.chat.completions.create(model="raw", messages=msgs).model == "up-raw"
        assert {c.model for c in client.chat.completions.create(model="raw", messages=msgs, stream=True)} == {
            "up-raw"}


def test_anthropic_responses_name_the_public_model(
    gateway: Callable[..., GatewayProcess], openai_and_anthropic: tuple[Up, Up]
) -> None:
    gw = gateway(_naming_config(openai_and_anthropic))
    msgs: Any = [{"role": "user", "content": "hi"}]
    with anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0) as client:
        for asked in ("claude-public", "mini"):  # pass-through, then translated from OpenAI
            assert client.messages.create(model=asked, max_tokens=16, messages=msgs).model == asked
            with client.messages.stream(model=asked, max_tokens=16, messages=msgs) as stream:
                assert stream.get_final_message().model == asked
    # On the wire: the one event that names the model, message_start, names the public one.
    r = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "claude-public", "max_tokens": 16, "stream": True, "messages": msgs})
    events = _sse_data(r.text)
    assert events[0]["type"] == "message_start" and events[0]["message"]["model"] == "claude-public"
    assert "claude-up" not in r.text


# -- 3. a misplaced /v1 is a misconfiguration, not the request's fault ----------------------


def _nov1_config(ups: tuple[Up, Up]) -> dict[str, Any]:
    (oa, _), (an, _) = ups
    return {
        "providers": {
            "nov1": {"type": "openai", "base_url": oa.url, "api_key": "k"},  # should end in /v1
            "good": {"type": "openai", "base_url": oa.url + "/v1", "api_key": "k"},
            "claude": {"type": "anthropic", "base_url": an.url, "api_key": "k"},
            "subpath": {"type": "anthropic", "base_url": an.url + "/anthropic", "api_key": "k"},  # no such path
        },
        "models": [
            {"name": "broken", "provider": "nov1", "model": "up-model"},
            {"name": "fine", "provider": "good", "model": "up-model"},
            {"name": "claude", "provider": "subpath", "model": "claude-up"},
            {"name": "either", "deployments": [{"provider": "nov1", "model": "up-model", "priority": 0},
                                               {"provider": "good", "model": "up-model", "priority": 1}]},
        ],
        "reliability": {"retry": {"backoff_base": 0.01, "backoff_max": 0.02}},
    }


def test_a_route_404_is_reported_as_a_misconfigured_provider(
    gateway: Callable[..., GatewayProcess], openai_and_anthropic: tuple[Up, Up]
) -> None:
    (_, o), _ = openai_and_anthropic
    gw = gateway(_nov1_config(openai_and_anthropic))
    for _ in range(2):
        r = chat(gw.url, model="broken")
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "upstream_misconfigured" and "nov1" in err["message"]
        assert "base_url" in err["message"] and "/v1" in err["message"]
    # Not retried against the same deployment (it answers the same every time)...
    assert r.headers["x-hapax-attempts"] == "1"
    # ...but another deployment of the model still serves it.
    r = chat(gw.url, model="either")
    assert r.status_code == 200 and r.headers["x-hapax-deployment"] == "good/up-model"
    assert r.headers["x-hapax-attempts"] == "2"

    m = httpx.post(gw.url + "/v1/messages", timeout=10, json={
        "model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert m.status_code == 502 and "https://api.anthropic.com" in m.json()["error"]["message"]

    health = httpx.get(gw.url + "/v1/health/providers", timeout=10).json()["providers"]
    assert "answered 404 for the route itself" in health["nov1"]["misconfigured"]
    assert health["subpath"]["misconfigured"] is not None and health["good"]["misconfigured"] is None
    warnings = [ln for ln in gw.logs().splitlines() if "provider misconfigured" in ln and "nov1" in ln]
    assert len(warnings) == 1  # once, not once per call

    # api.openai.com says a route is missing in its own error shape: still misconfigured.
    o.faults.append({"status": 404, "message": "Invalid URL (POST /chat/completions)"})
    r = chat(gw.url, model="fine")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_misconfigured"

    # A 404 from the API itself (OpenAI's model_not_found) stays the request's problem.
    o.faults.append({"status": 404, "message": "The model `up-model` does not exist"})
    r = chat(gw.url, model="fine")
    assert r.status_code == 404 and r.json()["error"]["code"] == "upstream_bad_request"
    assert "does not exist" in r.json()["error"]["message"]


def test_config_validate_probe_names_misconfigured_and_unreachable_providers(
    tmp_path: Path, openai_and_anthropic: tuple[Up, Up]
) -> None:
    def validate(cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "hapax.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return subprocess.run([sys.executable, "-m", "node", "config", "validate", "--probe", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    cfg = _nov1_config(openai_and_anthropic)
    cfg["providers"]["gone"] = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    out = validate(cfg)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = dict(ln.split(": ", 1) for ln in out.stdout.splitlines() if ln.startswith("provider "))
    assert lines["provider good"] == "ok"
    assert lines["provider nov1"].startswith("misconfigured: ") and "/v1" in lines["provider nov1"]
    assert lines["provider subpath"].startswith("misconfigured: ") and lines["provider claude"] == "ok"
    assert lines["provider gone"].startswith("unreachable: ")
    assert "3 of 5 providers failed" in out.stdout

    good = {"providers": {"good": cfg["providers"]["good"]}, "models": [cfg["models"][1]]}
    out = validate(good)
    assert out.returncode == 0 and "provider good: ok" in out.stdout
