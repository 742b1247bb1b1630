"""Process lifecycle: graceful drain, hot reload, hang-ups and timeouts, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import ROOT, GatewayProcess
from tests.upstreams.server import UpstreamServer, UpstreamState

SLOW_REPLY = " ".join(f"w{i}" for i in range(15))


def _demo(**server: Any) -> dict[str, Any]:
    return {
        "server": {"reload_interval": 0.2, **server},
        "providers": {"slow": {"type": "mock", "mock": {"chunk_delay_ms": 100, "reply": SLOW_REPLY}}},
        "models": [{"name": "slow", "provider": "slow"}],
    }


def _wait(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _stream_in_thread(gw: GatewayProcess, model: str, out: dict[str, Any]) -> threading.Thread:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)

    def run() -> None:
        try:
            text = ""
            with client:
                for c in client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "go"}], stream=True
                ):
                    text += (c.choices[0].delta.content or "") if c.choices else ""
                    out["started"] = True
            out["text"] = text
        except Exception as exc:  # reported to the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_a_stream_in_flight(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_demo(drain_delay=0.5, shutdown_grace=10))
    out: dict[str, Any] = {}
    t = _stream_in_thread(gw, "slow", out)
    _wait(lambda: out.get("started", False))
    gw.signal(signal.SIGTERM)
    # While draining, readiness is false but the stream keeps going.
    _wait(lambda: httpx.get(gw.url + "/health/ready").status_code == 503, timeout=2)
    t.join(15)
    assert out.get("text") == SLOW_REPLY, out.get("error")
    assert gw.proc is not None
    assert gw.proc.wait(10) == 0
    # The listener is closed: new connections are refused.
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/health/live")
    assert '"abandoned_requests":0' in gw.logs()


def test_hot_reload_applies_valid_and_keeps_last_good(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_demo())
    out: dict[str, Any] = {}
    t = _stream_in_thread(gw, "slow", out)
    _wait(lambda: out.get("started", False))
    # Replace the config: 'slow' is gone, 'fresh' is new.
    gw.write_config({
        "server": {"reload_interval": 0.2},
        "providers": {"m": {"type": "mock"}},
        "models": [{"name": "fresh", "provider": "m"}],
    })
    _wait(lambda: [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]] == ["fresh"])
    # The stream that started on the old config finishes on it.
    t.join(15)
    assert out.get("text") == SLOW_REPLY, out.get("error")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])

    # An invalid file is rejected with the key path, and the last good config stays.
    gw.write_config({"providers": {"m": {"type": "mock", "bogus_key": 1}}, "models": []})
    _wait(lambda: "config reload rejected" in gw.logs())
    assert "providers.m.bogus_key: unknown key" in gw.logs()
    assert [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]] == ["fresh"]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'hapax_config_reloads_total{result="failure"} 1' in metrics
    assert 'hapax_config_reloads_total{result="success"} 1' in metrics
    assert "hapax_config_generation 2" in metrics


def test_sighup_reloads_now(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway({**_demo(), "server": {"reload_interval": 3600}})
    gw.write_config({"server": {"reload_interval": 3600}, "providers": {"m": {"type": "mock"}},
                     "models": [{"name": "after-hup", "provider": "m"}]})
    gw.signal(signal.SIGHUP)
    _wait(lambda: httpx.get(gw.url + "/v1/models/after-hup").status_code == 200)


def _upstream_config(url: str, **timeouts: float) -> dict[str, Any]:
    return {
        "providers": {"up": {"type": "openai", "base_url": url + "/v1", "api_key": "k",
                             "timeouts": timeouts}},
        "models": [{"name": "m", "provider": "up"}],
    }


def test_client_hangup_cancels_upstream_call(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway(_upstream_config(server.url))
    state.faults.append({"hang": 8})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", timeout=0.5, json={
            "model": "m", "messages": [{"role": "user", "content": "x"}]})
    # The gateway drops its upstream call at once, not after the upstream's 8 s.
    _wait(lambda: state.disconnects == 1, timeout=3)
    _wait(lambda: "status\":499" in gw.logs(), timeout=3)


def test_first_byte_timeout_is_504(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway(_upstream_config(server.url, first_byte=0.3))
    state.faults.extend([{"hang": 3}] * 3)  # one per attempt the retry policy may make
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


def _collect_stream(gw: GatewayProcess) -> tuple[str, openai.APIError | None]:
    text = ""
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
        return _collect(client, text)


def _collect(client: openai.OpenAI, text: str) -> tuple[str, openai.APIError | None]:
    try:
        for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            text += (c.choices[0].delta.content or "") if c.choices else ""
    except openai.APIError as exc:
        return text, exc
    return text, None


def test_stream_cut_after_first_byte_ends_with_error_event(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway(_upstream_config(server.url))
    state.faults.append({"truncate_stream_after": 2})
    raw = httpx.post(gw.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[0].startswith("data: {")
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_unavailable"
    assert "[DONE]" not in raw
    # The official SDK surfaces it as an error, not a silently short answer.
    state.faults.append({"truncate_stream_after": 2})
    text, err = _collect_stream(gw)
    assert err is not None and text == "Hello"


def test_stalled_stream_hits_idle_timeout(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway(_upstream_config(server.url, stream_idle=0.3))
    # Stall after the first event: a stream that stalls before it would fail over instead.
    state.faults.append({"chunk_delay": 1.0, "chunk_delay_from": 1})
    raw = httpx.post(gw.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}).text
    last = json.loads([e for e in raw.split("\n\n") if e][-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_stream_idle"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_cli_config_validate_and_schema(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("providers:\n  p: {type: mock}\nmodels:\n  - {name: a, provider: p}\n")
    r = _cli("config", "validate", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  p: {type: openai, base_url: 'not a url'}\n")
    r = _cli("config", "validate", str(bad))
    assert r.returncode == 1
    assert "providers.p" in r.stderr and "base_url" in r.stderr
    env_bad = tmp_path / "env.yaml"
    env_bad.write_text("providers:\n  p: {type: openai, api_key: '${HAPAX_TEST_UNSET_VAR}'}\n")
    r = _cli("config", "validate", str(env_bad))
    assert r.returncode == 1 and "providers.p.api_key: environment variable HAPAX_TEST_UNSET_VAR" in r.stderr
    r = _cli("config", "schema")
    schema = json.loads(r.stdout)
    assert {"server", "providers", "models"} <= set(schema["properties"])


def test_secrets_in_config_never_printed(gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("providers:\n  p: {type: openai, api_key: sk-super-secret-value, base_url: 'x'}\n")
    r = _cli("config", "validate", str(cfg))
    assert r.returncode == 1 and "sk-super-secret-value" not in r.stderr + r.stdout


def test_client_hangup_mid_stream_cancels_upstream(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway(_upstream_config(server.url))
    state.reply = " ".join(["word"] * 60)  # 60 chunks x 0.1 s: a 6 s stream
    state.faults.append({"chunk_delay": 0.1})
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]
    }) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    # Hanging up closes the upstream stream at its next chunk, long before its end.
    _wait(lambda: state.disconnects == 1, timeout=2)
    _wait(lambda: "status\":499" in gw.logs(), timeout=2)
