"""Provider health shared through Redis, shown through real nodes.

A deployment's breaker that opens on one node opens on the others (pub/sub), a
429 cool-down on one node cools the deployment down on the others, and a node
started later learns both from what Redis still holds. Each node keeps its own
view, read on every request; only changes travel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from tests.gateway_process import GatewayProcess
from tests.reliability_support import chat, chats, wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState


def _config(redis_url: str, upstream: str) -> dict[str, Any]:
    return {
        "providers": {"a": {"type": "openai", "base_url": upstream + "/v1"}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "reliability": {
            "retry": {"max_attempts": 1},
            "circuit_breaker": {"consecutive_failures": 1, "open_for": 60, "max_cooldown": 60},
        },
        "state": {"cluster": "health", "redis": {"url": redis_url}},
    }


def _state(node: GatewayProcess) -> str:
    deps = httpx.get(node.url + "/v1/health/providers", timeout=5).json()["deployments"]
    return str(next(d for d in deps if d["deployment"] == "a/gpt-a")["state"])


def test_a_breaker_that_opens_on_one_node_opens_on_the_others(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    cfg = _config(redis_url, server.url)
    a, b = gateway(cfg), gateway(cfg)
    assert _state(b) == "closed"
    up.faults.append({"status": 500})
    assert chat(a.url).status_code == 502
    assert _state(a) == "open"
    wait_for(lambda: _state(b) == "open", what="the peer's breaker open on b")
    r = chat(b.url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_upstream"
    assert chats(up.seen) == 1  # b never called the broken deployment
    # A node that starts now learns it from Redis, not from a message it never saw.
    c = gateway(cfg)
    wait_for(lambda: _state(c) == "open", what="the open breaker on a node started later")
    assert chat(c.url).status_code == 503 and chats(up.seen) == 1


def test_a_429_cool_down_on_one_node_cools_the_deployment_on_the_others(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    cfg = _config(redis_url, server.url)
    a, b = gateway(cfg), gateway(cfg)
    up.faults.append({"status": 429, "retry_after": 30})
    r = chat(a.url)
    assert r.status_code == 429
    wait_for(lambda: _state(b) == "cooling_down", what="the peer's cool-down on b")
    assert _state(a) == "cooling_down"
    rb = chat(b.url)
    assert rb.status_code == 503 and "cooling down after 429" in rb.json()["error"]["message"]
    assert chats(up.seen) == 1  # b waited out the cool-down it heard of, without calling
