"""Queue priority comes from the caller's key, and a header cannot beat what the key allows."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway_process import GatewayProcess
from tests.reliability_support import chats, metric, wait_for
from tests.test_access_http import ENV, make_key
from tests.upstreams.server import UpstreamServer, UpstreamState


def _chat(gw: GatewayProcess, key: str, content: str, prio: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "x-hapax-dedup": "off"}
    if prio is not None:
        headers["x-hapax-priority"] = prio
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers, timeout=10,
                      json={"model": "m", "messages": [{"role": "user", "content": content}]})


def test_key_priority_caps_the_header(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    gw = gateway({
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}"},
        "providers": {"up": {"type": "openai", "base_url": server.url + "/v1", "api_key": "k"}},
        "models": [{"name": "m", "provider": "up"}],
        "reliability": {"admission": {"max_concurrency": 1}},
    }, env=ENV)
    batch, _ = make_key(gw, name="batch", max_priority=5, default_priority=7)
    urgent, _ = make_key(gw, name="urgent", max_priority=0, default_priority=3)
    state.faults.append({"hold": 10})
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(_chat, gw, urgent, "busy")
        wait_for(lambda: chats(state.seen) == 1, what="first call upstream")
        queued = []
        for i, (key, content, prio) in enumerate((
            (batch, "batch asks 0, gets 5", "0"),
            (urgent, "urgent default 3", None),
            (urgent, "urgent asks 1", "1"),
        )):
            queued.append(pool.submit(_chat, gw, key, content, prio))
            wait_for(lambda n=i + 1: metric(gw.url, "hapax_queue_depth") == n, what=f"{i + 1} queued")
        state.release.set()
        assert all(f.result(10).status_code == 200 for f in [busy, *queued])
    order = [s.body["messages"][0]["content"] for s in state.seen if s.method == "POST"]
    assert order == ["busy", "urgent asks 1", "urgent default 3", "batch asks 0, gets 5"]
