"""The shared-state work of one lone request, as a node does it, without HTTP: memory vs Redis.

At one request in flight (``--connections 1``) a node's Redis state costs what no
batching can share, and the node benchmark's noise (±50 µs per request on a
2-core VM) hides changes of a few µs. This runs the state calls a node makes per
request, in the node's order, on one uvloop: the in-flight dedup lead is claimed
and the reservation queued in one loop iteration (one write, one round trip),
the call is made as the lead, then its result is finished and the reservation
settled, and the next request starts one loop iteration later (at c=1 the
response and the client's next request lie between: the settlement leaves in a
write of its own). The scope is the node benchmark's: global requests, tokens
and concurrency limits that never refuse.

Three variants, alternately, ``--rounds`` times in fresh processes' worth of
state (the client pinned to core 0, its own redis-server to core 1):

- ``memory``: memory state and in-process dedup (the embedded default);
- ``redis-nodedup``: Redis state, dedup off;
- ``redis``: Redis state and shared dedup (the default with Redis).

    python -m bench.lone_request [--requests 3000] [--rounds 8]

It prints CPU µs per request of each round and the median and minimum of each
variant; the difference to ``memory`` is what Redis costs a lone request's
gateway. To compare two trees, run it in each (``cd /tmp/old && python -m bench.lone_request``,
this file copied there if it is older), alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import msgpack
import uvloop
from redis.asyncio import Redis

from hapax.config import RateLimits
from hapax.state import (
    DEDUP_LUA,
    AccessState,
    AccessStateBreaker,
    Ask,
    Bus,
    Codec,
    FailoverState,
    Grant,
    InFlight,
    MemoryInFlight,
    MemoryState,
    RedisInFlight,
    RedisState,
    Scope,
    Script,
    dedup_key,
)

from .procs import pinned_redis

ASK = Ask((Scope("global", "", RateLimits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent=10**6)),),
          (), tokens=300, usd=0.0)
#: A chat completion the size of the node benchmark's upstream reply.
REPLY = (b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"'
         + b"y" * 300 + b'"}}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}')
#: What the node's codec packs for another process: provider, model, raw reply, usage, headers, attempts, time.
CODEC: Codec[bytes] = Codec(lambda r: bytes(msgpack.packb(["bench", "m", r, True, [10, 20, 0, True], {}, 1, 0.001])),
                            lambda b: msgpack.unpackb(b)[2])
VARIANTS = ("memory", "redis-nodedup", "redis")


async def run(variant: str, requests: int, url: str) -> float:
    """CPU µs per request of ``requests`` lone requests on ``variant``'s state."""
    closers: list[Callable[[], Awaitable[None]]] = []
    dedup: InFlight
    state: AccessState
    if variant == "memory":
        state = MemoryState()  # as node builds it without Redis: nothing to fail over from
        dedup = MemoryInFlight()
    else:
        shared = RedisState.from_url(url, cluster="lone", timeout=2.0)
        failover = state = FailoverState(shared, workers=1)
        bus = Bus(Redis.from_url(url), timeout=2.0)
        # As node builds it: the dedup script shares the access state's batcher and breaker.
        script = Script(shared.client, DEDUP_LUA, timeout=2.0, batch=shared.batch)
        redis_dedup = RedisInFlight(script, bus, AccessStateBreaker(failover), cluster="lone")
        await bus.start()
        await redis_dedup.start()
        dedup = redis_dedup
        closers += [redis_dedup.aclose, bus.aclose]
    await state.start()
    with_dedup = variant != "redis-nodedup"

    async def upstream() -> bytes:
        return REPLY

    async def one(i: int) -> None:
        key = dedup_key("p", "m", "chat", {"messages": [{"role": "user", "content": f"q{i}"}]}) if with_dedup else None
        claim = dedup.claim(key) if key is not None and dedup.claims else None
        grant = await state.reserve(ASK)
        assert isinstance(grant, Grant), grant
        if key is not None:
            try:
                await dedup.run(key, upstream, CODEC)
            finally:
                dedup.unclaim(claim)
        else:
            await upstream()
        await state.settle(grant, tokens=300, usd=0.0)
        await asyncio.sleep(0)  # the response and the next request: the settlement's write leaves alone

    for i in range(300):  # warm: connections, scripts, caches
        await one(-i - 1)
    c0 = time.process_time()
    for i in range(requests):
        await one(i)
    cpu = (time.process_time() - c0) / requests * 1e6
    for close in closers:
        await close()
    await state.aclose()
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per variant per round")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    server = pinned_redis()
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for rnd in range(a.rounds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for v in order:
                cpu[v].append(uvloop.run(run(v, a.requests, server.url)))
            print(f"round {rnd + 1}: " + "  ".join(f"{v} {cpu[v][-1]:.1f}" for v in VARIANTS), flush=True)
    finally:
        server.stop()
    base_med, base_min = statistics.median(cpu["memory"]), min(cpu["memory"])
    print()
    for v in VARIANTS:
        med, low = statistics.median(cpu[v]), min(cpu[v])
        print(f"{v:14} median {med:6.1f} us/request ({med - base_med:+6.1f} vs memory)   "
              f"min {low:6.1f} ({low - base_min:+6.1f})")


if __name__ == "__main__":
    main()
