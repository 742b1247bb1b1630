"""Client CPU per access reservation plus settlement, memory vs Redis state.

Runs ``reserve`` then ``settle`` of a typical request (a key with requests, tokens
and concurrency limits plus a daily USD budget, and a global requests limit)
from ``--callers`` concurrent tasks on one uvloop, against a redis-server it
starts on a free port, and reports the process's CPU time per pair (what the
gateway pays; Redis's own CPU is another process) and the wall time per pair.

    python -m bench.state_cost [--pairs 20000] [--callers 32]

The client is pinned to core 0 and redis-server to core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from hapax.config import Budget, RateLimits
from hapax.state import AccessState, Ask, BudgetScope, Grant, MemoryState, RedisState, Scope

from .procs import pinned_redis

ASK = Ask(
    (
        Scope("key", "key_bench", RateLimits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent=10**6)),
        Scope("global", "", RateLimits(requests_per_minute=10**9)),
    ),
    (BudgetScope("key", "key_bench", Budget(daily_usd=10.0**9)),),
    tokens=300,
    usd=0.001,
)


async def run(state: AccessState, pairs: int, callers: int) -> tuple[float, float]:
    await state.start()

    async def caller(n: int) -> None:
        for _ in range(n):
            g = await state.reserve(ASK)
            assert isinstance(g, Grant), g
            await state.settle(g, tokens=250, usd=0.0008)

    await caller(100)  # warm: connections, scripts, caches
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(pairs // callers) for _ in range(callers)))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    await state.aclose()
    done = pairs // callers * callers
    return cpu / done * 1e6, wall / done * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--callers", type=int, default=32)
    a = ap.parse_args()
    server = pinned_redis()
    try:
        for name, make in (("memory", MemoryState), ("redis", lambda: RedisState.from_url(server.url, timeout=2.0))):
            for callers in sorted({1, a.callers}):
                cpu, wall = uvloop.run(run(make(), a.pairs if callers > 1 else a.pairs // 4, callers))
                print(f"{name:6} {callers:3} callers: {cpu:6.1f} us CPU, {wall:7.1f} us wall per reserve+settle")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
