"""Redis stopped and started again under shared slots, through two real nodes.

Each test runs its own redis-server, so stopping it disturbs no other test. With
``reliability.admission.max_concurrency: 1`` shared, a call held on one node makes
the other node's call wait (and time out). With Redis gone, ``fail_open`` serves
from local slots and ``fail_closed`` answers 429 ``state_unavailable``; the
degraded gauge goes to 1, and back to 0 when Redis returns, after which the one
slot is the cluster's again, without a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.reliability_support import chat, chats, metric, wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def _config(redis: RedisServer, upstream: str, policy: str) -> dict[str, Any]:
    return {
        "providers": {"a": {"type": "openai", "base_url": upstream + "/v1"}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "reliability": {"admission": {"max_concurrency": 1, "queue_timeout": 0.3}, "dedup": {"enabled": False}},
        "state": {"cluster": "outage", "on_redis_failure": policy, "redis": {"url": redis.url, "timeout": 0.25}},
    }


def _degraded(node: GatewayProcess) -> float:
    return metric(node.url, "hapax_degraded", dependency="redis")


def _shared(a: GatewayProcess, b: GatewayProcess, up: UpstreamState) -> None:
    """One call held on ``a`` fills the cluster's one slot: ``b``'s call times out in the queue."""
    up.release.clear()
    up.faults.append({"hold": 20})
    seen = chats(up.seen)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(chat, a.url, "held", timeout=30)
        wait_for(lambda: chats(up.seen) == seen + 1, what="the held call upstream")
        r = chat(b.url, "waits")
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
        up.release.set()
        assert held.result(30).status_code == 200


def _recovers(a: GatewayProcess, b: GatewayProcess, redis: RedisServer) -> None:
    redis.start()
    # Each node probes Redis once a second, on a request: call until both say shared again.
    for node in (a, b):
        wait_for(lambda n=node: chat(n.url, "probe").status_code == 200 and _degraded(n) == 0,
                 timeout=15, what="shared again")


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_stopped_and_started_again_under_shared_slots(
    gateway: Callable[..., GatewayProcess], own_redis: RedisServer,
    openai_upstream: tuple[UpstreamServer, UpstreamState], policy: str,
) -> None:
    server, up = openai_upstream
    cfg = _config(own_redis, server.url, policy)
    a, b = gateway(cfg), gateway(cfg)
    assert _degraded(a) == 0 and _degraded(b) == 0
    _shared(a, b, up)
    own_redis.stop()
    r = chat(a.url, "during the outage")
    if policy == "fail_open":
        assert r.status_code == 200  # a local slot
    else:
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "state_unavailable" and err["param"] == "state.on_redis_failure"
        assert "Redis" in err["message"] and int(r.headers["retry-after"]) >= 1
    assert _degraded(a) == 1
    assert a.logs().count("redis unavailable") == 1  # one breaker per node, one line
    _recovers(a, b, own_redis)
    assert a.logs().count("redis reachable again") == 1
    _shared(a, b, up)  # the one slot is the cluster's again
