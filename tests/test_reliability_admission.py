"""Admission queueing, deduplication and active probes, through a running gateway."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.reliability_support import Ups, chat, chats, metric, wait_for
from tests.upstreams.server import UpstreamState, free_port


def _config(ups: Ups, *, admission: dict[str, Any] | None = None, dedup: bool = True,
            deployment_limit: int | None = None) -> dict[str, Any]:
    deps: list[dict[str, Any]] = [
        {"provider": name, "model": f"gpt-{name}", "priority": i} for i, name in enumerate("ab"[: len(ups)])]
    if deployment_limit is not None:
        deps[0]["max_concurrency"] = deployment_limit
    return {
        "providers": {name: {"type": "openai", "base_url": server.url + "/v1"}
                      for name, (server, _) in zip("ab", ups, strict=False)},
        "models": [{"name": "m", "deployments": deps}],
        "reliability": {"admission": admission or {}, "dedup": {"enabled": dedup}},
    }


def _contents(state: UpstreamState) -> list[str]:
    return [s.body["messages"][0]["content"] for s in state.seen if s.method == "POST"]


def _depth(url: str, n: int) -> Callable[[], bool]:
    return lambda: metric(url, "hapax_queue_depth") == n


def test_full_node_queues_by_priority_fifo_within(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], admission={"max_concurrency": 1}))
    a.faults.append({"hold": 10})
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(chat, gw.url, "busy")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        futures = []
        for i, (content, prio) in enumerate((("low", "9"), ("high-1", "0"), ("high-2", "0"))):
            futures.append(pool.submit(chat, gw.url, content, headers={"x-hapax-priority": prio}))
            wait_for(_depth(gw.url, i + 1), what=f"{i + 1} queued")
        a.release.set()
        assert all(f.result(10).status_code == 200 for f in [busy, *futures])
    assert _contents(a) == ["busy", "high-1", "high-2", "low"]
    assert metric(gw.url, "hapax_queue_wait_seconds_count") >= 3
    assert metric(gw.url, "hapax_queue_depth") == 0


def test_queue_full_and_queue_timeout_are_rejected_with_retry_after(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], admission={"max_concurrency": 1, "queue_size": 1, "queue_timeout": 0.5,
                                            "reject_status": 429}))
    a.faults.append({"hang": 2.0})
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(chat, gw.url, "busy")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        waiting = pool.submit(chat, gw.url, "waits")
        wait_for(_depth(gw.url, 1), what="one queued")
        full = chat(gw.url, "no room")
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        timed_out = waiting.result(10)
        assert timed_out.status_code == 429 and timed_out.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in timed_out.headers
        assert busy.result(10).status_code == 200
    assert metric(gw.url, "hapax_queue_rejections_total", reason="queue_full") == 1
    assert metric(gw.url, "hapax_queue_rejections_total", reason="queue_timeout") == 1


def test_a_client_that_hangs_up_leaves_the_queue_at_once(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], admission={"max_concurrency": 1, "queue_timeout": 30}))
    a.faults.append({"hang": 1.5})
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(chat, gw.url, "busy")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        with pytest.raises(httpx.ReadTimeout):
            chat(gw.url, "impatient", timeout=0.4)
        wait_for(_depth(gw.url, 0), timeout=2, what="the queue to empty")
        assert busy.result(10).status_code == 200
    assert _contents(a) == ["busy"]  # the one who left was never sent upstream
    assert chat(gw.url, "after").status_code == 200  # and holds no slot


def test_full_deployment_is_skipped_for_one_with_room(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), (_, b) = ab
    gw = gateway(_config(ab, deployment_limit=1))
    a.faults.append({"hang": 1.0})
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(chat, gw.url, "busy")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        r = chat(gw.url, "second")
        assert r.headers["x-hapax-deployment"] == "b/gpt-b" and r.headers["x-hapax-attempts"] == "1"
        assert busy.result(10).headers["x-hapax-deployment"] == "a/gpt-a"
    assert _contents(b) == ["second"]


def test_identical_concurrent_requests_share_one_upstream_call(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1]))
    a.faults.append({"hang": 0.8})
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(chat, gw.url, "same")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        rest = [pool.submit(chat, gw.url, "same") for _ in range(2)]
        replies = [f.result(10) for f in [first, *rest]]
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == ["from a"] * 3
    assert sorted(r.headers.get("x-hapax-dedup", "") for r in replies) == ["", "shared", "shared"]
    assert chats(a.seen) == 1
    assert metric(gw.url, "hapax_deduplicated_requests_total", model="m") == 2
    # Opting out, and streams, always make their own call.
    a.faults.append({"hang": 0.5})
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(chat, gw.url, "again")
        wait_for(lambda: chats(a.seen) == 2, what="call upstream")
        other = pool.submit(chat, gw.url, "again", headers={"x-hapax-dedup": "off"})
        stream = pool.submit(chat, gw.url, "again", stream=True)
        assert all(f.result(10).status_code == 200 for f in (first, other, stream))
    assert chats(a.seen) == 4


def test_dedup_can_be_turned_off(gateway: Callable[..., GatewayProcess], ab: Ups) -> None:
    (_, a), _ = ab
    gw = gateway(_config(ab[:1], dedup=False))
    a.faults.append({"hang": 0.5})
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, gw.url, "same")
        wait_for(lambda: chats(a.seen) == 1, what="first call upstream")
        second = pool.submit(chat, gw.url, "same")
        assert first.result(10).status_code == second.result(10).status_code == 200
    assert chats(a.seen) == 2


def test_probes_mark_a_dead_provider_unhealthy_and_routing_skips_it(
    gateway: Callable[..., GatewayProcess], ab: Ups
) -> None:
    (server, a), _ = ab
    dead = f"http://127.0.0.1:{free_port()}/v1"
    probe = {"enabled": True, "interval": 0.1, "timeout": 0.5, "healthy_threshold": 1, "unhealthy_threshold": 2}
    gw = gateway({
        "providers": {"dead": {"type": "openai", "base_url": dead, "health_check": probe},
                      "a": {"type": "openai", "base_url": server.url + "/v1", "health_check": probe},
                      "demo": {"type": "mock", "health_check": probe}},
        "models": [{"name": "m", "deployments": [{"provider": "dead", "model": "x"},
                                                 {"provider": "a", "model": "gpt-a", "priority": 1}]}],
    })

    def providers() -> dict[str, Any]:
        return dict(httpx.get(gw.url + "/v1/health/providers", timeout=5).json()["providers"])

    wait_for(lambda: providers()["dead"]["probe"] == "unhealthy" and providers()["a"]["probe"] == "healthy",
             what="probe verdicts")
    p = providers()
    assert p["demo"]["probe"] == "healthy" and "cannot connect" in p["dead"]["last_probe_error"]
    assert any(s.method == "GET" and s.path == "/v1/models" for s in a.seen)  # the cheap probe, no tokens
    r = chat(gw.url)
    assert r.headers["x-hapax-deployment"] == "a/gpt-a" and r.headers["x-hapax-attempts"] == "1"
    ready = httpx.get(gw.url + "/health/ready", timeout=5).json()
    assert ready["providers"]["dead"]["probe"] == "unhealthy"
    assert ready["deployments"]["dead/x"] == "open"  # probe results feed the breaker
    assert metric(gw.url, "hapax_provider_healthy", provider="dead") == 0
    assert metric(gw.url, "hapax_provider_healthy", provider="a") == 1
    assert metric(gw.url, "hapax_health_probes_total", provider="dead", result="fail") >= 2
