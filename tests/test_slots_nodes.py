"""Concurrency slots and the priority queue shared through Redis, shown through two real nodes.

Two ``hapax serve`` processes on different ports, one real redis-server, the same
cluster name, ``reliability.admission.max_concurrency`` of the cluster: waiters
queued on either node are served in priority order (FIFO within a priority),
woken by whichever node frees the slot; a node killed with SIGKILL while holding
slots gives them back within ``state.lease_seconds``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.gateway_process import GatewayProcess
from tests.reliability_support import chat, chats, metric, wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState


def _config(redis_url: str, upstream: str, *, admission: dict[str, Any], lease: float = 30.0) -> dict[str, Any]:
    return {
        "providers": {"a": {"type": "openai", "base_url": upstream + "/v1"}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "reliability": {"admission": admission},
        "state": {"cluster": "slots", "redis": {"url": redis_url}, "lease_seconds": lease},
    }


def _contents(state: UpstreamState) -> list[str]:
    return [s.body["messages"][0]["content"] for s in state.seen if s.method == "POST"]


def _queued(*nodes: GatewayProcess) -> int:
    return int(sum(metric(n.url, "hapax_queue_depth") for n in nodes))


def test_the_priority_queue_orders_waiters_from_both_nodes(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    cfg = _config(redis_url, server.url, admission={"max_concurrency": 1, "queue_timeout": 30})
    a, b = gateway(cfg), gateway(cfg)
    up.faults.append({"hold": 20})
    with ThreadPoolExecutor(6) as pool:
        busy = pool.submit(chat, a.url, "busy", timeout=40)
        wait_for(lambda: chats(up.seen) == 1, what="first call upstream")
        futures = []
        line = (("low", "9", b), ("high-1", "0", a), ("mid", "5", b), ("high-2", "0", b), ("high-3", "0", a))
        for i, (content, prio, node) in enumerate(line):
            futures.append(pool.submit(chat, node.url, content, headers={"x-hapax-priority": prio}, timeout=40))
            wait_for(lambda n=i + 1: _queued(a, b) == n, what=f"{i + 1} queued across the nodes")
        assert metric(a.url, "hapax_queue_depth") == 2 and metric(b.url, "hapax_queue_depth") == 3
        up.release.set()
        assert [f.result(40).status_code for f in [busy, *futures]] == [200] * 6
    # One slot for the cluster: each call reached the upstream alone, in queue order.
    assert _contents(up) == ["busy", "high-1", "high-2", "high-3", "mid", "low"]
    assert _queued(a, b) == 0


def test_slots_of_a_node_killed_with_sigkill_are_back_within_the_lease(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    lease = 2.0
    cfg = _config(redis_url, server.url, admission={"max_concurrency": 2, "queue_timeout": 0.3}, lease=lease)
    doomed, survivor = gateway(cfg), gateway(cfg)
    up.faults.extend([{"hold": 30}, {"hold": 30}])
    with ThreadPoolExecutor(2) as pool:
        for i in range(2):
            pool.submit(chat, doomed.url, f"held {i}", timeout=40)
        wait_for(lambda: chats(up.seen) == 2, what="both of the cluster's slots held by one node")
        # The survivor sees the cluster full: its call waits out the queue timeout.
        full = chat(survivor.url, "no room")
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_timeout"
        doomed.signal(signal.SIGKILL)
        assert doomed.proc is not None and doomed.proc.wait(10) == -signal.SIGKILL
        # Nobody releases the dead node's slots; their leases run out. Bounded poll: the lease
        # plus a renewal period of the survivor (which sweeps the expired leases), with slack.
        served = wait_for(lambda: chat(survivor.url, "after").status_code == 200, timeout=lease * 5,
                          what="the dead node's slots back")
        assert served
        up.release.set()
    assert chats(up.seen) == 3
