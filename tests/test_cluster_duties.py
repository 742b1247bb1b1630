"""Leader duties and shared passive health, through three ``hapax serve --etcd`` processes.

Each node's bootstrap file gives the provider an ``x-node`` header of its own,
so the mock upstream can tell which node sent each probe (``GET /v1/models``).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.etcd_server import EtcdServer
from tests.gateway_process import GatewayProcess
from tests.reliability_support import chat, chats
from tests.test_cluster_nodes import TTL, leaders, metric, wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState

PROBE_EVERY = 0.2


def _config(upstream: str, node: int) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "providers": {"a": {
            "type": "openai", "base_url": upstream + "/v1", "headers": {"x-node": str(node)},
            "health_check": {"enabled": True, "interval": PROBE_EVERY, "healthy_threshold": 1,
                             "unhealthy_threshold": 1},
        }},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "reliability": {
            "retry": {"max_attempts": 1},
            "circuit_breaker": {"consecutive_failures": 1, "open_for": 60, "max_cooldown": 60},
        },
        "cluster": {"lease_ttl": TTL},
    }


def _probes(up: UpstreamState, since: int = 0) -> Counter[str]:
    return Counter(s.headers.get("x-node", "?") for s in up.seen[since:] if s.method == "GET")


def _health(g: GatewayProcess) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(g.url + "/v1/health/providers", timeout=5).json()
    return doc


def _deployment_state(g: GatewayProcess) -> str:
    return str(next(d for d in _health(g)["deployments"] if d["deployment"] == "a/gpt-a")["state"])


@pytest.fixture
def nodes(gateway: Callable[..., GatewayProcess], etcd_server: EtcdServer, redis_url: str, cluster_name: str,
          openai_upstream: tuple[UpstreamServer, UpstreamState]) -> list[GatewayProcess]:
    server, _ = openai_upstream
    args = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    out = [gateway(_config(server.url, i), redis=redis_url, args=args) for i in range(3)]
    wait_for(lambda: all(metric(g, "hapax_cluster_nodes") == 3 for g in out), "three members")
    wait_for(lambda: len(leaders(out)) == 1, "a leader")
    return out


def test_only_the_leader_probes_and_probing_moves_with_leadership(
    nodes: list[GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    _, up = openai_upstream
    leader = leaders(nodes)[0]
    idx = str(nodes.index(leader))
    start = len(up.seen)
    wait_for(lambda: sum(_probes(up, start).values()) >= 10, "ten probes")
    assert set(_probes(up, start)) == {idx}, _probes(up, start)
    # The followers never probed, yet they know the verdict: the leader's, through Redis.
    for g in nodes:
        wait_for(lambda g=g: _health(g)["providers"]["a"]["probe"] == "healthy", "the verdict on every node")

    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait()
    rest = [g for g in nodes if g is not leader]
    wait_for(lambda: len(leaders(rest)) == 1, "a new leader", timeout=TTL + 10, every=0.01)
    new_idx = str(nodes.index(leaders(rest)[0]))
    start = len(up.seen)
    wait_for(lambda: sum(_probes(up, start).values()) >= 10, "ten probes after the failover")
    assert set(_probes(up, start)) == {new_idx}, _probes(up, start)


def test_a_breaker_tripped_by_one_nodes_traffic_is_avoided_by_the_others_within_a_second(
    nodes: list[GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    _, up = openai_upstream
    a, *others = nodes
    assert all(_deployment_state(g) == "closed" for g in nodes)
    up.faults.append({"status": 500})
    assert chat(a.url).status_code == 502
    tripped = time.monotonic()
    wait_for(lambda: all(_deployment_state(g) == "open" for g in others), "the breaker open everywhere",
             timeout=1.0, every=0.01)
    print(f"\nbreaker open on the other two nodes {(time.monotonic() - tripped) * 1000:.0f} ms after the trip")
    before = chats(up.seen)
    for g in others:
        r = chat(g.url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_upstream"
    assert chats(up.seen) == before  # the others never sent a call to the broken deployment
