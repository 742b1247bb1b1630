"""In-flight dedup across processes: identical concurrent requests on two nodes share one call.

Through two real ``hapax serve`` processes sharing one redis-server and cluster
name: the second node's request waits for the first node's upstream call and gets
its result; when the leading node is killed with SIGKILL, the follower stops
waiting once the leader's lease has run out and makes the call itself. And the
seam itself, with two ``RedisInFlight`` instances standing for two processes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from hapax.state import DEDUP_LUA, Bus, Codec, RedisBreaker, RedisInFlight, Script
from tests.gateway_process import GatewayProcess
from tests.reliability_support import chat, chats, lead_and_follow, metric, wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState


def _config(redis_url: str, upstream: str, *, lease: float = 30.0) -> dict[str, Any]:
    return {
        "providers": {"a": {"type": "openai", "base_url": upstream + "/v1"}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "state": {"cluster": "dedup", "redis": {"url": redis_url}, "lease_seconds": lease},
    }


def _followers(redis_url: str) -> int:
    r = SyncRedis.from_url(redis_url)
    try:
        return sum(int(r.scard(k)) for k in r.scan_iter(match="hapax:dedup:dd:f:*"))
    finally:
        r.close()


def test_identical_requests_on_two_nodes_share_one_upstream_call(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    cfg = _config(redis_url, server.url)
    a, b = gateway(cfg), gateway(cfg)
    ra, rb = lead_and_follow(a.url, b.url, up, lambda: _followers(redis_url) == 1)
    assert ra.status_code == rb.status_code == 200
    assert chats(up.seen) == 1  # one upstream call for both nodes
    assert rb.json()["choices"] == ra.json()["choices"]
    assert rb.headers["x-hapax-dedup"] == "shared" and "x-hapax-dedup" not in ra.headers
    assert metric(b.url, "hapax_deduplicated_requests_total", model="m") == 1
    # Over: the next identical request makes a fresh call (dedup, not a cache).
    assert chat(b.url, "same question").status_code == 200
    assert chats(up.seen) == 2


def test_a_follower_calls_itself_once_the_dead_leaders_lease_runs_out(
    gateway: Callable[..., GatewayProcess], redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    server, up = openai_upstream
    cfg = _config(redis_url, server.url, lease=1.0)
    doomed, survivor = gateway(cfg), gateway(cfg)
    up.faults.append({"hold": 30})
    with ThreadPoolExecutor(2) as pool:
        pool.submit(chat, doomed.url, "same question", timeout=40)
        wait_for(lambda: chats(up.seen) == 1, what="the leader's call upstream")
        follow = pool.submit(chat, survivor.url, "same question", timeout=40)
        wait_for(lambda: _followers(redis_url) == 1, what="the survivor following")
        doomed.signal(signal.SIGKILL)
        r = follow.result(40)
        up.release.set()
    assert r.status_code == 200 and "x-hapax-dedup" not in r.headers
    assert chats(up.seen) == 2  # the survivor's own call


# -- the seam, two instances standing for two processes --------------------------------------


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RedisInFlight, RedisInFlight]]:
    made = []
    for _ in range(2):
        client = Redis.from_url(redis_url, socket_timeout=0.5)
        bus = Bus(Redis.from_url(redis_url), timeout=0.5)
        d = RedisInFlight(Script(client, DEDUP_LUA, timeout=0.5), bus,
                          RedisBreaker(retry_interval=1.0, clock=time.monotonic), cluster="seam", lease_seconds=1.0)
        await bus.start()
        await d.start()
        made.append((d, bus, client))
    yield made[0][0], made[1][0]
    for d, bus, client in made:
        await d.aclose()
        await bus.aclose()
        await client.aclose()


TEXT = Codec(lambda s: s.encode(), lambda b: b.decode())


async def test_one_call_for_identical_keys_in_two_processes_and_in_each(
    pair: tuple[RedisInFlight, RedisInFlight],
) -> None:
    one, two = pair
    calls = 0
    gate = asyncio.Event()

    async def call() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "answer"

    tasks = [asyncio.create_task(d.run("k", call, TEXT)) for d in (one, two, one, two)]
    deadline = time.monotonic() + 10
    while len(one) + len(two) < 2 or not (one._following or two._following):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # bounded poll: both processes in, one following
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert calls == 1
    assert sorted(r for r, _ in results) == ["answer"] * 4
    assert sorted(shared for _, shared in results) == [False, True, True, True]


async def test_a_failed_leader_leaves_followers_to_call_themselves(
    pair: tuple[RedisInFlight, RedisInFlight],
) -> None:
    one, two = pair
    gate = asyncio.Event()

    async def fails() -> str:
        await gate.wait()
        raise RuntimeError("upstream broke")

    async def works() -> str:
        return "own answer"

    leader = asyncio.create_task(one.run("k2", fails, TEXT))
    deadline = time.monotonic() + 10
    while not one._leading:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    follower = asyncio.create_task(two.run("k2", works, TEXT))
    while not two._following:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(RuntimeError):
        await leader
    assert await asyncio.wait_for(follower, 10) == ("own answer", False)


async def test_a_claim_is_the_lead_run_uses_and_a_claim_given_up_frees_it_at_once(
    pair: tuple[RedisInFlight, RedisInFlight],
) -> None:
    # A claim asks for the lead ahead of run (in the admission's round trip); run takes its
    # answer without asking again, and a claim given up (a refused request) ends the lead
    # now, so another process's identical request does not wait out the lease (1 s here).
    one, two = pair
    ops = one.script.operations
    token = one.claim("k3")
    assert token is not None and one.claim("k3") is None  # one claim per key and process
    assert await one.run("k3", _answer("mine"), TEXT) == ("mine", False)
    await asyncio.sleep(0.1)  # the release, queued as the call ended, is sent
    assert one.script.operations - ops == 2  # the claim's join and the release: no second join
    one.unclaim(token)  # run used it: nothing to do

    token = one.claim("k4")
    await asyncio.sleep(0.1)  # the claim's join has its answer: one leads k4
    one.unclaim(token)
    t0 = time.monotonic()
    assert await asyncio.wait_for(two.run("k4", _answer("theirs"), TEXT), 5) == ("theirs", False)
    assert time.monotonic() - t0 < 0.5 and not one._following and not one._claims


def _answer(text: str) -> Callable[[], Any]:
    async def call() -> str:
        return text

    return call
