"""Redis stopped under load, then started again, with two real nodes sharing it.

Each test runs its own redis-server (so stopping it disturbs no other test), two
``hapax serve`` nodes with ``HAPAX_WORKERS=4`` and a global concurrency limit of 4
on a slow mock model, driven by the openai SDK. Shared, the two nodes admit 4
calls of a burst between them; under ``fail_open`` each checks locally against
4 / 4 workers = 1; under ``fail_closed`` every call is refused with
``state_unavailable``. Every call is answered either way, the degraded gauge goes
1 then 0, and once Redis is back the limit is shared again without a restart.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from hapax.config import RateLimits
from hapax.state import Ask, FailoverState, Grant, RedisState, Scope
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

DEGRADED = re.compile(r'^hapax_degraded\{dependency="redis"\} (\S+)$', re.M)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def config(redis: RedisServer, **state: Any) -> dict[str, Any]:
    limits = state.pop("limits", {})
    return {
        # Slow enough that a whole burst is in flight at once.
        "providers": {"slow": {"type": "mock", "mock": {"reply": "ok", "latency_ms": 1500}}},
        "models": [{"name": "demo", "provider": "slow"}],
        "limits": {"concurrent": 4, **limits},
        "state": {"cluster": "outage", "redis": {"url": redis.url, "timeout": 0.25}, **state},
    }


async def call(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
    try:
        await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"hi {i}"}])
        return 200, None
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        return exc.status_code, body.get("code")


class Burst:
    """20 calls at once, alternating between two nodes."""

    def __init__(self, nodes: list[GatewayProcess]) -> None:
        self.clients = [openai.AsyncOpenAI(base_url=n.url + "/v1", api_key="none", max_retries=0, timeout=30)
                        for n in nodes]
        self.tasks = [asyncio.create_task(call(self.clients[i % 2], i)) for i in range(20)]

    async def answered(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while sum(t.done() for t in self.tasks) < n:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)  # bounded poll

    async def results(self) -> list[tuple[int, str | None]]:
        out = await asyncio.wait_for(asyncio.gather(*self.tasks), 60)
        for c in self.clients:
            await c.close()
        return list(out)


def degraded(node: GatewayProcess) -> float:
    m = DEGRADED.search(httpx.get(node.url + "/metrics", timeout=5).text)
    assert m is not None
    return float(m.group(1))


async def recover(nodes: list[GatewayProcess]) -> None:
    """Call each node until it has probed Redis and found it back (its gauge at 0)."""
    deadline = time.monotonic() + 30
    for node in nodes:
        async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0) as c:
            while degraded(node) != 0:
                assert time.monotonic() < deadline, node.logs()
                status, code = await call(c, 0)
                assert status == 200 or (status == 429 and code is not None), (status, code)
                await asyncio.sleep(0.1)  # bounded poll: the next probe is due within retry_interval


def codes(results: list[tuple[int, str | None]]) -> dict[tuple[int, str | None], int]:
    out: dict[tuple[int, str | None], int] = {}
    for r in results:
        out[r] = out.get(r, 0) + 1
    return out


async def test_fail_open_checks_locally_per_worker_and_shares_again_after_redis_returns(
    gateway: Callable[..., GatewayProcess], own_redis: RedisServer
) -> None:
    nodes = [gateway(config(own_redis), env={"HAPAX_WORKERS": "4"}) for _ in range(2)]
    assert [degraded(n) for n in nodes] == [0, 0]
    # Redis stops mid-load: the 4 admitted calls are in flight and still answered.
    burst = Burst(nodes)
    await burst.answered(16)
    own_redis.stop()
    assert codes(await burst.results()) == {(200, None): 4, (429, "concurrency_limit_exceeded"): 16}
    # Redis down, fail_open (the default): each node admits 4 / 4 workers = 1.
    assert codes(await Burst(nodes).results()) == {(200, None): 2, (429, "concurrency_limit_exceeded"): 18}
    assert [degraded(n) for n in nodes] == [1, 1]
    own_redis.start()
    await recover(nodes)
    assert codes(await Burst(nodes).results()) == {(200, None): 4, (429, "concurrency_limit_exceeded"): 16}
    for n in nodes:  # one log line per transition
        logs = n.logs()
        assert logs.count("redis unavailable") == 1 and logs.count("limits are shared again") == 1, logs


async def test_fail_closed_refuses_naming_the_cause_and_recovers(
    gateway: Callable[..., GatewayProcess], own_redis: RedisServer
) -> None:
    # The default stays fail_open; the global limits override it: per-limit policy.
    cfg = config(own_redis, limits={"on_redis_failure": "fail_closed"})
    nodes = [gateway(cfg, env={"HAPAX_WORKERS": "4"}) for _ in range(2)]
    own_redis.stop()
    results = await Burst(nodes).results()
    assert codes(results) == {(429, "state_unavailable"): 20}
    assert [degraded(n) for n in nodes] == [1, 1]
    async with openai.AsyncOpenAI(base_url=nodes[0].url + "/v1", api_key="none", max_retries=0) as c:
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    assert "Redis" in info.value.message and info.value.response.headers.get("retry-after")
    own_redis.start()
    await recover(nodes)
    assert codes(await Burst(nodes).results()) == {(200, None): 4, (429, "concurrency_limit_exceeded"): 16}


async def test_a_dead_redis_is_tried_once_per_retry_interval_not_per_request(own_redis: RedisServer) -> None:
    clock = [0.0]
    shared = RedisState.from_url(own_redis.url, cluster="breaker", timeout=0.25)
    state = FailoverState(shared, workers=2, retry_interval=1.0, monotonic=lambda: clock[0])
    changes: list[bool] = []
    state.on_change = changes.append
    ask = Ask((Scope("global", "", RateLimits(requests_per_minute=10)),))
    assert isinstance(await state.reserve(ask), Grant)
    own_redis.stop()
    results = [await state.reserve(ask) for _ in range(50)]
    # One failed round trip opened the breaker; the other 49 never waited on Redis.
    assert shared.batch.round_trips == 2
    assert sum(isinstance(r, Grant) for r in results) == 5  # the local share: 10 / 2 workers
    clock[0] += 1.0
    await state.reserve(ask)  # the probe: still down
    assert shared.batch.round_trips == 3 and changes == [True]
    own_redis.start()
    clock[0] += 1.0
    assert isinstance(await state.reserve(ask), Grant)  # the probe finds it back
    assert changes == [True, False] and not state.degraded
    await state.aclose()
