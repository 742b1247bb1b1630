"""``python -m bench.relay_cost --before DIR --after DIR``: CPU per relayed stream event, no sockets.

Each tree's ``Gateway`` runs in a fresh interpreter (cwd and PYTHONPATH that tree)
behind a fake upstream transport that hands over one SSE event per read, each
read after a turn of the event loop, as a socket would. Streams are consumed as
the front door consumes them (``async for`` over the response's stream), 50 at
a time. CPU time (``time.process_time``) of ``--streams`` streams of
``--short`` and of ``--long`` events gives the cost of one event without the
stream's set-up: (long - short) / (events between them). What it leaves out is
the kernel's part (two loopback syscalls per event) and aiohttp's write, which
no tree changes; what it keeps is every Python layer an event crosses, from the
transport's iterator to the bytes the front door would write.

    python -m bench.relay_cost --before /tmp/old --after .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .procs import ROOT

_CHILD = r"""
import asyncio, gc, json, sys, time
import uvloop
from hapax import Config, Gateway, Request
from hapax._transport import Transport, UpstreamResponse

SHORT, LONG, STREAMS, REPEATS = (int(x) for x in sys.argv[1:5])

def frame(i, finish=None, usage=None):
    obj = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
           "created": 1700000000, "model": "bench-upstream-model", "system_fingerprint": "fp_bench",
           "choices": [] if usage else [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None,
                                          "finish_reason": finish}]}
    if usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

def frames(n):
    out = [frame(i, "stop" if i == n - 1 else None) for i in range(n)]
    out.append(frame(0, usage={"prompt_tokens": 24, "completion_tokens": n, "total_tokens": 24 + n}))
    out.append(b"data: [DONE]\n\n")
    return out

class Resp(UpstreamResponse):
    status = 200
    headers = {"content-type": "text/event-stream"}
    def __init__(self, chunks):
        self.chunks = chunks
    async def read(self):
        return b"".join(self.chunks)
    async def iter_chunks(self):
        for c in self.chunks:
            await asyncio.sleep(0)  # one loop turn per read, as a socket's data_received
            yield c
    def close(self):
        pass

class Fake(Transport):
    chunks: list = []
    async def send(self, request):
        return Resp(Fake.chunks)
    async def aclose(self):
        pass

cfg = Config.model_validate({
    "providers": {"bench": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}},
    "models": [{"name": "bench-model", "provider": "bench", "model": "bench-upstream-model"}],
})
body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}).encode()
headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}

async def one(gw, n):
    resp = await gw.handle(Request("POST", "/v1/chat/completions", headers, body, "127.0.0.1"))
    got = 0
    stream = resp.stream
    try:
        async for chunk in stream:
            got += chunk.count(b"data: ")
    finally:
        await stream.aclose()
    assert got == n + 2, (got, n)

async def wave(gw, n):
    Fake.chunks = frames(n)
    sem = asyncio.Semaphore(50)
    async def bounded():
        async with sem:
            await one(gw, n)
    t0 = time.process_time()
    await asyncio.gather(*(bounded() for _ in range(STREAMS)))
    return time.process_time() - t0

async def main():
    gw = Gateway(cfg, transport_factory=lambda name, pc: Fake())
    await wave(gw, SHORT)  # warm-up
    gc.collect(); gc.freeze()
    out = []
    for _ in range(REPEATS):
        short = await wave(gw, SHORT)
        long = await wave(gw, LONG)
        out.append((long - short) * 1e6 / (STREAMS * (LONG - SHORT)))
    print(json.dumps({"us_per_event": out, "setup_us": short * 1e6 / STREAMS}))

uvloop.run(main())
"""


def _run(tree: Path, a: argparse.Namespace) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [a.python, "-c", _CHILD, str(a.short), str(a.long), str(a.streams), "1"]
    if a.cpu is not None:
        cmd = ["taskset", "-c", a.cpu, *cmd]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    result: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", default=ROOT, type=Path)
    p.add_argument("--short", type=int, default=10, help="events in a short stream (10)")
    p.add_argument("--long", type=int, default=110, help="events in a long stream (110)")
    p.add_argument("--streams", type=int, default=200, help="streams per wave, 50 at a time (200)")
    p.add_argument("--rounds", type=int, default=5, help="fresh interpreters per tree, alternating (5)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--cpu", help="taskset CPU list for the children")
    a = p.parse_args(argv)
    got: dict[str, list[float]] = {"before": [], "after": []}
    setup: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(a.rounds):
        for name, tree in (("before", a.before), ("after", a.after))[:: 1 if r % 2 == 0 else -1]:
            res = _run(tree.resolve(), a)
            got[name] += res["us_per_event"]
            setup[name].append(float(res["setup_us"]))  # type: ignore[arg-type]
            print(f"round {r + 1} {name:<6} {res['us_per_event'][0]:6.2f} us/event  "
                  f"(stream of {a.short}: {res['setup_us']:.0f} us)", flush=True)
    b, af = statistics.median(got["before"]), statistics.median(got["after"])
    print(f"\nbefore {b:.2f} us/event (median of {len(got['before'])}), after {af:.2f}: "
          f"after/before {af / b:.3f}; a stream of {a.short} events: "
          f"{statistics.median(setup['before']):.0f} -> {statistics.median(setup['after']):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
