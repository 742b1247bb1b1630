"""Retries, failover and circuit breakers, through a running gateway and faulty upstreams.

Two OpenAI-compatible upstreams, ``a`` (preferred, scripted to fail) and ``b``
(healthy). Every fault ends in b's answer or a clear error, and /metrics says
what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.gateway_process import GatewayProcess
from tests.reliability_support import Ups, chat, chats, metric, wait_for


def _config(ups: Ups, *, strategy: str = "failover", breaker: dict[str, Any] | None = None,
            retry: dict[str, Any] | None = None, timeouts: dict[str, float] | None = None) -> dict[str, Any]:
    providers = {
        name: {"type": "openai", "base_url": server.url + "/v1", "api_key": "k",
               "timeouts": timeouts or {"first_byte": 5, "stream_idle": 5}}
        for name, (server, _) in zip("ab", ups, strict=False)
    }
    return {
        "providers": providers,
        "models": [{"name": "m", "strategy": strategy, "deployments": [
            {"provider": name, "model": f"gpt-{name}", "priority": i} for i, name in enumerate(providers)]}],
        "reliability": {
            "circuit_breaker": {"consecutive_failures": 50, **(breaker or {})},
            "retry": {"backoff_base": 0.01, "backoff_max": 0.05, **(retry or {})},
        },
    }


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("fault", [
    {"status": 500}, {"status": 502}, {"status": 503}, {"reset": True}, {"truncate_body": True},
    {"malformed": True},
], ids=["500", "502", "503", "reset", "truncated_body", "malformed_json"])
def test_a_failed_attempt_fails_over_to_the_next_deployment(
    gateway: Callable[..., GatewayProcess], ab: Ups, fault: dict[str, Any]
) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab))
    a.faults.append(fault)
    r = chat(gw.url)
    assert r.status_code == 200 and _text(r) == "from b"
    assert r.headers["x-hapax-attempts"] == "2"
    assert r.headers["x-hapax-deployment"] == "b/gpt-b"
    assert r.headers["x-hapax-provider"] == "b" and r.headers["x-hapax-upstream-model"] == "gpt-b"
    assert chats(a.seen) == 1 and chats(b.seen) == 1
    assert metric(gw.url, "hapax_failovers_total", model="m") == 1
    assert metric(gw.url, "hapax_retries_total", model="m") == 1
    assert metric(gw.url, "hapax_upstream_attempts_total", deployment="b/gpt-b", outcome="ok") == 1


def test_hang_hits_first_byte_timeout_then_fails_over(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab, timeouts={"first_byte": 0.3}))
    a.faults.append({"hang": 10})
    r = chat(gw.url)
    assert _text(r) == "from b" and r.headers["x-hapax-attempts"] == "2"
    assert metric(gw.url, "hapax_upstream_attempts_total", deployment="a/gpt-a", outcome="upstream_timeout") == 1


def test_streams_that_fail_before_the_first_event_fail_over(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab, timeouts={"first_byte": 5, "stream_idle": 0.3}))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10)
    # malformed SSE, a stream that stalls before its first event, a 500 on a stream request
    a.faults.extend([{"malformed_stream": True}, {"chunk_delay": 3}, {"status": 500}])
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == "from b" and raw.headers["x-hapax-attempts"] == "2"
    outcomes = {o: metric(gw.url, "hapax_upstream_attempts_total", deployment="a/gpt-a", outcome=o)
                for o in ("upstream_malformed_stream", "upstream_stream_idle", "upstream_unavailable")}
    assert outcomes == {"upstream_malformed_stream": 1, "upstream_stream_idle": 1, "upstream_unavailable": 1}


def test_stream_cut_after_first_byte_is_not_retried_and_ends_with_an_error_event(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab))
    a.faults.append({"truncate_stream_after": 2})
    r = chat(gw.url, stream=True)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert r.headers["x-hapax-attempts"] == "1"
    assert orjson.loads(events[-1])["error"]["code"] == "upstream_unavailable"
    assert chats(b.seen) == 0
    assert metric(gw.url, "hapax_upstream_attempts_total", deployment="a/gpt-a",
                  outcome="stream_upstream_unavailable") == 1


def test_429_with_retry_after_cools_the_deployment_down(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab))
    a.faults.append({"status": 429, "retry_after": 30})
    assert _text(chat(gw.url)) == "from b"
    r = chat(gw.url)  # a is cooling down: not even tried
    assert _text(r) == "from b" and r.headers["x-hapax-attempts"] == "1"
    assert chats(a.seen) == 1
    health = httpx.get(gw.url + "/v1/health/providers", timeout=5).json()
    dep = {d["deployment"]: d for d in health["deployments"]}
    assert dep["a/gpt-a"]["state"] == "cooling_down" and dep["a/gpt-a"]["cooldown_remaining_s"] > 20
    assert dep["a/gpt-a"]["breaker"] == "closed" and dep["b/gpt-b"]["state"] == "closed"


def test_retry_after_is_waited_out_on_a_single_deployment_and_too_long_is_429(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], retry={"retry_after_cap": 2}))
    a.faults.append({"status": 429, "retry_after": 1})
    r = chat(gw.url)
    assert _text(r) == "from a" and r.headers["x-hapax-attempts"] == "2"
    a.faults.append({"status": 429, "retry_after": 60})
    r = chat(gw.url)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert r.json()["error"]["code"] == "upstream_rate_limited"


def test_everything_failing_is_a_clear_bounded_error(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab, retry={"max_attempts": 3}))
    a.always = b.always = {"status": 503}
    r = chat(gw.url)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers.get("x-request-id")
    assert chats(a.seen) + chats(b.seen) == 3  # bounded: max_attempts across both
    assert metric(gw.url, "hapax_retries_total", model="m") == 2


def test_breaker_opens_skips_the_deployment_then_recovers_through_half_open(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab, breaker={"consecutive_failures": 2, "open_for": 0.5}))
    a.always = {"status": 500}
    for _ in range(2):
        assert _text(chat(gw.url)) == "from b"
    assert metric(gw.url, "hapax_circuit_state", deployment="a/gpt-a") == 2
    assert metric(gw.url, "hapax_circuit_transitions_total", deployment="a/gpt-a", to="open") == 1
    r = chat(gw.url)  # open: a is skipped without a call
    assert _text(r) == "from b" and r.headers["x-hapax-attempts"] == "1" and chats(a.seen) == 2
    a.always = None

    def half_open() -> bool:
        health = httpx.get(gw.url + "/v1/health/providers", timeout=5).json()
        return any(d["deployment"] == "a/gpt-a" and d["breaker"] == "half_open" for d in health["deployments"])

    wait_for(half_open, what="breaker half-open")
    r = chat(gw.url)  # the trial goes to a, succeeds and closes the breaker
    assert _text(r) == "from a"
    assert metric(gw.url, "hapax_circuit_state", deployment="a/gpt-a") == 0
    assert metric(gw.url, "hapax_circuit_transitions_total", deployment="a/gpt-a", to="closed") == 1
    assert '"circuit breaker open"' in gw.logs() or "circuit breaker open" in gw.logs()
    assert chats(b.seen) == 3


def test_all_breakers_open_is_503_with_retry_after(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], breaker={"consecutive_failures": 1, "open_for": 30}))
    a.always = {"status": 500}
    assert chat(gw.url).status_code == 502
    r = chat(gw.url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_upstream"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert chats(a.seen) == 1


def test_cross_provider_failover_to_another_provider_type(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (server, a), _ = ab
    cfg = {
        "providers": {"a": {"type": "openai", "base_url": server.url + "/v1"},
                      "demo": {"type": "mock", "mock": {"reply": "from mock"}}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"},
                                                 {"provider": "demo", "model": "mock-1", "priority": 1}]}],
    }
    gw = gateway(cfg)
    a.faults.append({"reset": True})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert raw.parse().choices[0].message.content == "from mock"
    assert raw.headers["x-hapax-deployment"] == "demo/mock-1"


def test_round_robin_spreads_and_skips_a_failing_deployment(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab, strategy="round_robin"))
    texts = [_text(chat(gw.url, f"q{i}")) for i in range(4)]
    assert sorted(texts) == ["from a", "from a", "from b", "from b"]
    a.always = {"status": 500}
    assert {_text(chat(gw.url, f"r{i}")) for i in range(4)} == {"from b"}


def test_weighted_splits_traffic_by_weight(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    cfg = _config(ab, strategy="weighted")
    deps = cfg["models"][0]["deployments"]
    deps[0]["weight"], deps[1]["weight"] = 3, 1
    gw = gateway(cfg)
    picks = [_text(chat(gw.url, f"w{i}", headers={"x-hapax-dedup": "off"})) for i in range(200)]
    # Binomial(200, 0.75): mean 150, sd 6.1; the bounds are five sd either side.
    assert 120 <= picks.count("from a") <= 180, picks.count("from a")


def test_latency_strategy_settles_on_the_faster_deployment(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab, strategy="latency"))
    a.always = {"hang": 0.6}  # wide of a loaded machine's own jitter
    for i in range(2):  # both unmeasured: each gets measured first
        chat(gw.url, f"warm{i}")
    assert chats(a.seen) == 1 and chats(b.seen) == 1
    picks = [chat(gw.url, f"q{i}").headers["x-hapax-deployment"] for i in range(10)]
    assert picks.count("b/gpt-b") >= 8  # exploration may send an odd one to a
    health = httpx.get(gw.url + "/v1/health/providers", timeout=5).json()
    lat = {d["deployment"]: d["latency_ewma_ms"] for d in health["deployments"]}
    assert lat["a/gpt-a"] > lat["b/gpt-b"]


def test_least_in_flight_avoids_the_busy_deployment(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    from concurrent.futures import ThreadPoolExecutor

    (_, a), (_, b) = ab
    gw = gateway(_config(ab, strategy="least_in_flight"))
    a.faults.append({"hang": 1.0})
    b.faults.append({"hang": 1.0})
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, gw.url, "one")
        wait_for(lambda: chats(a.seen) + chats(b.seen) == 1, what="first call upstream")
        busy = "a/gpt-a" if chats(a.seen) else "b/gpt-b"
        second = chat(gw.url, "two")
        assert second.headers["x-hapax-deployment"] != busy
        assert first.result(10).headers["x-hapax-deployment"] == busy
