"""``python -m bench.h3load``: one load generator process, HTTP/3 (aioquic) or HTTP/1.1 (aiohttp).

wrk speaks no HTTP/3, so the HTTP/3 door is loaded by this Python client; the same
client drives HTTP/1.1 too, so the two doors are compared with the same load
generator (and wrk's HTTP/1.1 row says how much the Python client itself holds back).
``--connections`` connections each run one request at a time, back to back, for
``--duration`` seconds after ``--warmup``; the figures go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp

from . import wrk
from .h3client import client_configuration, connect


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.h3load")
    p.add_argument("--protocol", choices=("h1", "h3"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", help="the HTTP/3 door's certificate (h3)")
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--stream", action="store_true")
    return p.parse_args(argv)


Call = Callable[[bytes], Awaitable[bool]]


async def _h3_calls(a: argparse.Namespace, stack: AsyncExitStack) -> list[Call]:
    calls: list[Call] = []
    for _ in range(a.connections):
        c = await stack.enter_async_context(connect(a.host, a.port, client_configuration(cafile=a.cafile)))

        async def call(body: bytes, c: object = c) -> bool:
            from .h3client import H3Client

            assert isinstance(c, H3Client)
            r = await c.request("POST", "/v1/chat/completions", [
                ("content-type", "application/json"), ("authorization", f"Bearer {wrk.API_KEY}")], body)
            return r.status == 200 and (not a.stream or r.body.endswith(b"data: [DONE]\n\n"))

        calls.append(call)
    return calls


async def _h1_calls(a: argparse.Namespace, stack: AsyncExitStack) -> list[Call]:
    url = f"http://{a.host}:{a.port}/v1/chat/completions"
    headers = {"content-type": "application/json", "authorization": f"Bearer {wrk.API_KEY}"}
    calls: list[Call] = []
    for _ in range(a.connections):
        # One session per connection: each loop keeps its own keep-alive connection.
        s = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)))

        async def call(body: bytes, s: aiohttp.ClientSession = s) -> bool:
            async with s.post(url, data=body, headers=headers) as r:
                data = await r.read()
                return r.status == 200 and (not a.stream or data.endswith(b"data: [DONE]\n\n"))

        calls.append(call)
    return calls


async def _run(a: argparse.Namespace) -> dict[str, object]:
    template = wrk.request_body(a.stream)
    latencies: list[float] = []
    errors = 0
    counter = 0
    async with AsyncExitStack() as stack:
        calls = await (_h3_calls(a, stack) if a.protocol == "h3" else _h1_calls(a, stack))
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from = start + a.warmup
        stop = measure_from + a.duration

        async def worker(call: Call) -> None:
            nonlocal errors, counter
            while (t0 := loop.time()) < stop:
                counter += 1  # a unique body per request, as wrk's script does (no dedup)
                body = b'{"user":"bench-' + str(counter).encode() + b'",' + template[1:]
                try:
                    ok = await asyncio.wait_for(call(body), 10)
                except (TimeoutError, OSError, aiohttp.ClientError, ConnectionError):
                    ok = False
                if t0 >= measure_from:
                    if ok:
                        latencies.append(loop.time() - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(c) for c in calls))
        elapsed = loop.time() - measure_from
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {"requests": len(latencies), "errors": errors, "duration_s": elapsed,
            "rps": len(latencies) / elapsed if elapsed > 0 else 0.0, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    t0 = time.process_time()
    out = asyncio.run(_run(a))
    out["client_cpu_s"] = time.process_time() - t0
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
