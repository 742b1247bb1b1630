"""Limits shared through Redis, shown through two real nodes driven by the openai SDK.

Two ``hapax serve`` processes on different ports, one real redis-server, the same
cluster name: together they admit what one node would. Another cluster name on the
same Redis shares nothing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.gateway_process import ROOT, GatewayProcess
from tests.reliability_support import metrics
from tests.upstreams.server import UpstreamServer, UpstreamState


def node_config(redis_url: str, *, cluster: str = "shared", limits: dict[str, Any] | None = None,
                upstream: str | None = None, **state: Any) -> dict[str, Any]:
    providers: dict[str, Any] = {"mock": {"type": "mock", "mock": {"reply": "ok"}}}
    model = "mock"
    if upstream is not None:
        providers = {"up": {"type": "openai", "base_url": upstream + "/v1", "api_key": "sk-up"}}
        model = "up"
    return {
        "providers": providers,
        "models": [{"name": "demo", "provider": model}],
        "limits": limits or {},
        "state": {"cluster": cluster, "redis": {"url": redis_url}, **state},
    }


async def call(client: openai.AsyncOpenAI, i: int = 0) -> int:
    # Distinct prompts: identical concurrent calls would share one upstream call (dedup).
    try:
        await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"hi {i}"}])
        return 200
    except openai.RateLimitError as exc:
        return 429 if exc.status_code == 429 else -1


def clients(*nodes: GatewayProcess) -> list[openai.AsyncOpenAI]:
    return [openai.AsyncOpenAI(base_url=n.url + "/v1", api_key="none", max_retries=0, timeout=30) for n in nodes]


async def spread(cs: list[openai.AsyncOpenAI], n: int) -> list[int]:
    """``n`` calls at once, alternating between the nodes."""
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(call(cs[i % len(cs)], i) for i in range(n))), 60))
    finally:
        for c in cs:
            await c.close()


async def test_two_nodes_sharing_redis_admit_exactly_the_global_limit(
    gateway: Callable[..., GatewayProcess], redis_url: str
) -> None:
    cfg = node_config(redis_url, limits={"requests_per_minute": 10})
    a, b = gateway(cfg), gateway(cfg)
    codes = await spread(clients(a, b), 40)
    assert codes.count(200) == 10 and codes.count(429) == 30


async def test_another_cluster_name_on_the_same_redis_shares_nothing(
    gateway: Callable[..., GatewayProcess], redis_url: str
) -> None:
    a = gateway(node_config(redis_url, cluster="one", limits={"requests_per_minute": 10}))
    b = gateway(node_config(redis_url, cluster="two", limits={"requests_per_minute": 10}))
    assert (await spread(clients(a), 20)).count(200) == 10
    assert (await spread(clients(b), 20)).count(200) == 10  # its own ten, untouched by "one"


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # bounded poll


async def test_a_concurrency_limit_of_3_is_never_exceeded_across_two_nodes(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    up.always = {"hold": 20}  # every call waits at the upstream until released
    cfg = node_config(redis_url, limits={"concurrent": 3}, upstream=server.url)
    a, b = gateway(cfg), gateway(cfg)
    for round_ in range(2):  # the second round shows the slots came back when calls ended
        up.release.clear()
        seen = len(up.seen)
        cs = clients(a, b)
        tasks = [asyncio.create_task(call(cs[i % 2], i)) for i in range(12)]
        # The 9 refused answer at once; the 3 admitted are held at the upstream.
        await asyncio.to_thread(_wait, lambda ts=tasks: sum(t.done() for t in ts) == 9, "9 refusals")
        assert all(t.result() == 429 for t in tasks if t.done())
        await asyncio.to_thread(_wait, lambda n=seen: len(up.seen) - n >= 3, "3 calls at the upstream")
        assert len(up.seen) - seen == 3, round_
        up.release.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert codes.count(200) == 3 and codes.count(429) == 9
        assert len(up.seen) - seen == 3  # never a fourth
        for c in cs:
            await c.close()



def _in_flight(node: GatewayProcess) -> int:
    limits = httpx.get(node.url + "/v1/me", timeout=5).json()["limits"]
    return int(next(x for x in limits if x["scope"] == "global")["concurrent"]["in_flight"])


async def test_every_way_a_call_ends_gives_its_slot_back_in_redis(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    node = gateway(node_config(redis_url, limits={"concurrent": 2}, upstream=server.url))
    url = node.url + "/v1/chat/completions"

    def body(i: int, **kw: Any) -> dict[str, Any]:
        return {"model": "demo", "messages": [{"role": "user", "content": f"m{i}"}], **kw}

    async with httpx.AsyncClient(timeout=30) as c:
        assert (await c.post(url, json=body(1))).status_code == 200  # success
        assert (await c.post(url, json=body(2, stream=True))).status_code == 200  # a whole stream
        up.faults = [{"status": 400, "message": "bad"}]
        assert (await c.post(url, json=body(3))).status_code == 400  # an upstream error
        up.faults = [{"truncate_stream_after": 1}]
        r = await c.post(url, json=body(4, stream=True))  # the upstream cuts the stream
        assert r.status_code == 200 and b"error" in r.content
        up.faults = [{"chunk_delay": 2, "chunk_delay_from": 1}]
        async with c.stream("POST", url, json=body(5, stream=True)) as s:  # the client hangs up mid-stream
            async for _ in s.aiter_bytes():
                break
        up.faults = [{"hang": 5}]
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up before any answer
            await c.post(url, json=body(6), timeout=0.5)
        up.faults = [{"hold": 10}]
        up.release.clear()
        same = [asyncio.create_task(c.post(url, json=body(7))) for _ in range(2)]  # dedup: one upstream call
        await asyncio.to_thread(_wait, lambda: _in_flight(node) == 2, "both deduplicated calls admitted")
        up.release.set()
        assert [r.status_code for r in await asyncio.gather(*same)] == [200, 200]
    await asyncio.to_thread(_wait, lambda: _in_flight(node) == 0, "every slot back")


def _cli_key(redis_url: str, state_dir: Path, *args: str) -> str:
    """A key made before the nodes start, in the Redis both load their keys from at start-up."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = state_dir.parent / "cli.yaml"
    cfg.write_text(yaml.safe_dump(_keyed(redis_url, state_dir)))
    out = subprocess.run(
        [sys.executable, "-m", "node", "keys", "create", "-c", str(cfg), "--json", *args],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return str(json.loads(out)["key"])


def _keyed(redis_url: str, state_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "auth": {"mode": "keys", "admin_key": "hpx_admin_" + "A" * 40, "state_dir": str(state_dir)},
        "providers": {"slow": {"type": "mock", "mock": {"reply": "ok", "latency_ms": 600}}},
        "models": [{"name": "demo", "provider": "slow"}],
        # 1 token costs $0.001 in and $0.002 out.
        "pricing": {"demo": {"input": 1000.0, "output": 2000.0}},
        "state": {"cluster": "keyed", "redis": {"url": redis_url}},
        **extra,
    }


async def test_a_key_with_10_requests_per_minute_gets_10_of_40_across_two_nodes(
    gateway: Callable[..., GatewayProcess], redis_url: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "keys"
    key = _cli_key(redis_url, state_dir, "--name", "ten", "--rpm", "10")
    a, b = gateway(_keyed(redis_url, state_dir)), gateway(_keyed(redis_url, state_dir))
    cs = [openai.AsyncOpenAI(base_url=n.url + "/v1", api_key=key, max_retries=0, timeout=30) for n in (a, b)]
    codes = await spread(cs, 40)
    assert codes.count(200) == 10 and codes.count(429) == 30


async def test_a_team_usd_budget_shared_by_two_nodes_is_overspent_by_at_most_one_call(
    gateway: Callable[..., GatewayProcess], redis_url: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "keys"
    key = _cli_key(redis_url, state_dir, "--name", "a1", "--team", "alpha")
    cfg = _keyed(redis_url, state_dir, teams={"alpha": {"budget": {"daily_usd": 0.05}}})
    nodes = [gateway(cfg), gateway(cfg)]
    spent: list[float] = []

    async def one(c: httpx.AsyncClient, i: int) -> int:
        # 5 prompt tokens ($0.005) + 1 completion ($0.002) = $0.007; reserved with max_tokens=2: $0.009.
        r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                               "user": str(i)})
        if r.status_code == 200:
            spent.append(float(r.headers["x-hapax-cost-usd"]))
        return r.status_code

    async with httpx.AsyncClient(base_url=nodes[0].url, timeout=30) as c0, \
            httpx.AsyncClient(base_url=nodes[1].url, timeout=30) as c1:
        first = await asyncio.gather(*(one((c0, c1)[i % 2], i) for i in range(20)))
        assert first.count(200) == 5  # $0.05 holds five $0.009 reservations at once, across both nodes
        i = 20
        while await one((c0, c1)[i % 2], i) == 200:  # then one at a time until the budget says no
            i += 1
            assert i < 40
    assert sum(spent) <= 0.05 + max(spent)
    assert len(spent) == 6  # what one node alone admits (tests/test_access_http.py)


async def test_a_node_killed_holding_slots_gives_them_back_within_the_lease(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    up.always = {"hold": 30}
    up.release.clear()
    cfg = node_config(redis_url, limits={"concurrent": 3}, upstream=server.url, lease_seconds=1.0)
    doomed, survivor = gateway(cfg), gateway(cfg)
    cs = clients(doomed)
    held = [asyncio.create_task(call(cs[0], i)) for i in range(3)]
    await asyncio.to_thread(_wait, lambda: len(up.seen) == 3, "3 calls held at the upstream")
    doomed.signal(signal.SIGKILL)  # no settle, no drain: its three leases just stop being renewed
    await asyncio.gather(*held, return_exceptions=True)
    await cs[0].close()
    up.always = None
    (other,) = clients(survivor)
    assert await call(other, 100) == 429  # the dead node's slots are still leased
    deadline = time.monotonic() + 15
    while (status := await call(other, 101)) == 429:  # bounded poll: back within the 1 s lease
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert status == 200
    up.release.set()
    await other.close()


async def test_metrics_show_the_round_trips_to_redis_and_the_operations_they_carry(
    gateway: Callable[..., GatewayProcess], redis_url: str
) -> None:
    node = gateway(node_config(redis_url, limits={"concurrent": 10}))
    before = metrics(node.url)
    [c] = clients(node)
    for i in range(10):  # one at a time: each reservation waits for a round trip of its own
        assert await call(c, i) == 200
    await c.close()
    after = metrics(node.url)
    trips = after["hapax_redis_round_trip_seconds_count"] - before["hapax_redis_round_trip_seconds_count"]
    ops = after["hapax_redis_operations_total"] - before["hapax_redis_operations_total"]
    assert 10 <= trips < 15  # a round trip for each reservation; settlements wait for no reply
    assert ops >= 20  # a reservation and a settlement (the slot returned) per call
    assert 0 < after["hapax_redis_round_trip_seconds_sum"] - before["hapax_redis_round_trip_seconds_sum"] < trips
    assert after['hapax_redis_round_trip_seconds_bucket{le="+Inf"}'] == after["hapax_redis_round_trip_seconds_count"]
    plain = gateway(node_config(redis_url) | {"state": {}})
    assert not any(k.startswith("hapax_redis_") for k in metrics(plain.url))  # memory state: none
