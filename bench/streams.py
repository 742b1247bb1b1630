"""``python -m bench streams``: thousands of concurrent slow streams through one node.

The upstream writes each stream's chunks at a fixed interval, as a model
generating tokens does. A bounded load generator opens ``--streams``
connections over ``--ramp-s`` seconds, sends one streaming chat completion on
each and reads it to the end. For every stream it records when the first event
arrived (after the request was sent) and the worst gap between two reads that
carried events; a stall anywhere in the node (a long GC pause, a blocked loop)
shows up as a gap far above the chunk interval on every stream open at the
time. A probe meanwhile times ``GET /health/live`` every 100 ms.

Both the upstream and the generator are ``bench/sseload.c`` by default
(``--load native``, built by ``bench.native``): they share the machine's cores
with the node, and in C they take half of what the asyncio pair
(``bench/upstream.py --chunk-ms`` and ``_StreamReader`` here, ``--load python``)
takes.

``--gc tuned,default`` runs the node with its GC tuning (``node.server.tune_gc``)
and without, one after the other in the same run, so the two can be compared
on a machine whose load changes over time.

    python -m bench streams --streams 2000 --chunk-ms 100 --chunks 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import native, wrk
from .procs import ROOT, Proc, children_cpu_seconds, free_port, steal_seconds, wait_workers

#: ``cprofile`` is the tuned node under cProfile (its stats printed after the run): read shares, not times.
GC_MODES = {
    "tuned": ["-m", "node"], "default": ["-m", "bench.gc_default_node"], "cprofile": ["-m", "bench.cprofile_node"],
}


@dataclass
class StreamResult:
    first_event_s: float | None = None
    worst_gap_s: float = 0.0
    events: int = 0
    error: str = ""
    #: When the worst gap ended, seconds from the wave's start (the native generator's only).
    worst_gap_at_s: float | None = None


@dataclass
class Wave:
    gc_mode: str
    streams: list[StreamResult] = field(default_factory=list)
    live_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    node_gc: dict[str, float] = field(default_factory=dict)
    #: CPU used during the wave, in % of one core: a saturated node or generator skews everything.
    core_pct: dict[str, float] = field(default_factory=dict)

    def summary(self, chunk_ms: float) -> dict[str, Any]:
        ok = [s for s in self.streams if not s.error and s.first_event_s is not None]
        gaps = sorted(s.worst_gap_s * 1000 for s in ok)
        firsts = sorted((s.first_event_s or 0.0) * 1000 for s in ok)
        errors: dict[str, int] = {}
        for s in self.streams:
            if s.error:
                errors[s.error] = errors.get(s.error, 0) + 1
        return {
            "gc": self.gc_mode,
            "streams": len(self.streams),
            "ok": len(ok),
            "errors": errors,
            "worst_gap_ms_p50": pct(gaps, 50),
            "worst_gap_ms_p99": pct(gaps, 99),
            "worst_gap_ms_max": gaps[-1] if gaps else None,
            "worst_gap_over_interval_p99": (pct(gaps, 99) or 0) / chunk_ms,
            "first_event_ms_p50": pct(firsts, 50),
            "first_event_ms_p99": pct(firsts, 99),
            # Which second of the wave the over-target worst gaps (> 1.5 intervals) ended in:
            # all in the ramp is set-up load, one second for every stream is a stall.
            "late_gaps_by_second": _by_second(
                s.worst_gap_at_s for s in ok if s.worst_gap_at_s is not None and s.worst_gap_s * 1000 > 1.5 * chunk_ms
            ),
            "health_live_ms_max": max(self.live_ms) if self.live_ms else None,
            "health_live_ms_p50": statistics.median(self.live_ms) if self.live_ms else None,
            "wall_s": self.wall_s,
            "node_gc": self.node_gc,
            "core_pct": self.core_pct,
            # CPU time, so a node starved by other work on the machine does not inflate it.
            "node_cpu_us_per_event": (
                self.core_pct.get("node", 0) / 100 * self.wall_s * 1e6 / events
                if (events := sum(s.events for s in self.streams)) else None
            ),
        }


def _by_second(times: Iterable[float]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in times:
        out[int(t)] = out.get(int(t), 0) + 1
    return dict(sorted(out.items()))


def pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def _request(port: int) -> bytes:
    body = wrk.request_body(True)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {wrk.API_KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _StreamReader(asyncio.Protocol):
    """One stream read from the loop's own callback: no task wakes per read.

    The generator shares the machine with the node; a reader task per stream
    (a ``StreamReader`` and a ``wait_for`` per read) cost half a core at 2,000
    streams and its own loop lag showed up as gaps in the node's figures.
    """

    def __init__(self, request: bytes, out: StreamResult, done: asyncio.Future[None]) -> None:
        self.request, self.out, self.done = request, out, done
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0
        self.last: float | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]
        self.sent = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        out = self.out
        if out.events == 0 and not self.head.startswith(b"HTTP/1.1 200"):
            self.head += data
            if len(self.head) >= 12 and not self.head.startswith(b"HTTP/1.1 200"):
                self._end("status " + self.head[9:12].decode(errors="replace"))
                return
        n = data.count(b"data: ")
        if n:
            if self.last is None:
                out.first_event_s = now - self.sent
            else:
                out.worst_gap_s = max(out.worst_gap_s, now - self.last)
            self.last = now
            out.events += n
        if b"data: [DONE]" in data:
            self._end("")

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(type(exc).__name__ if exc else "closed early")

    def _end(self, error: str) -> None:
        if self.done.done():
            return
        self.out.error = error
        self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def _one_stream(port: int, delay: float, timeout: float, out: StreamResult) -> None:
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    proto = _StreamReader(_request(port), out, done)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: proto, "127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        out.error = f"connect: {type(exc).__name__}"
        return
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        proto._end("timeout")


async def _probe_live(port: int, stop: asyncio.Event, out: list[float]) -> None:
    req = f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
            writer.write(req)
            await asyncio.wait_for(reader.read(), 30)
            writer.close()
        except (OSError, TimeoutError):
            pass
        out.append((time.perf_counter() - t0) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def _native_streams(argv: list[str]) -> list[StreamResult]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"sseload streams exited {proc.returncode}")
    return [StreamResult(*native.parse_line(line)) for line in out.decode().splitlines()]


async def wave(
    port: int, n: int, ramp_s: float, timeout: float, *, probe: bool = True,
    native_argv: list[str] | None = None,
) -> tuple[list[StreamResult], list[float], float]:
    """One wave of ``n`` streams; with ``native_argv``, ``sseload streams`` generates them."""
    results = [StreamResult() for _ in range(n)]
    live: list[float] = []
    stop = asyncio.Event()
    prober = asyncio.create_task(_probe_live(port, stop, live) if probe else stop.wait())
    t0 = time.perf_counter()
    if native_argv is not None:
        results = await _native_streams(native_argv)
    else:
        await asyncio.gather(*(
            _one_stream(port, ramp_s * i / n, timeout, r) for i, r in enumerate(results)
        ))
    wall = time.perf_counter() - t0
    stop.set()
    await prober
    return results, live, wall


def run_loop(coro: Any) -> Any:
    """Run ``coro`` to the end on uvloop (asyncio's loop without it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _node_gc(port: int) -> dict[str, float]:
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("python_gc_collections_total", "python_gc_pause_seconds_sum",
                                "python_gc_pause_seconds_count")):
                name, _, value = line.rpartition(" ")
                name = _WORKER_LABEL.sub("", name)  # several workers: their collections add up
                out[name] = out.get(name, 0.0) + float(value)
    return out


_WORKER_LABEL = re.compile(r',?worker="\d+"')



def _config(port: int, upstream_port: int, streams: int) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": {
            "bench": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key": "sk-upstream-bench",
                "pool_size": streams + 100,
            }
        },
        "models": [{"name": wrk.MODEL, "provider": "bench", "model": "bench-upstream-model"}],
    }


def _own_cpu() -> float:
    """This process's CPU and its waited-for children's: the native generator's is the latter."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + children_cpu_seconds()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench streams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000, help="concurrent streams (2000)")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="ms between a stream's chunks (100)")
    p.add_argument("--chunks", type=int, default=30, help="content chunks per stream (30: 3 s at 100 ms)")
    p.add_argument("--ramp-s", type=float, default=1.0,
                   help="seconds over which the streams start (1.0; 0: all at once)")
    p.add_argument("--gc", default="tuned", help="node GC: tuned, default, or a comma list run in turn")
    p.add_argument("--waves", type=int, default=1, help="waves per GC mode (1)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--gateway-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--workers", type=int, default=1,
                   help="node worker processes (1); above 1 nothing is pinned, and the node's state "
                   "stays per worker (HAPAX_BENCH_UNSHARED_WORKERS): limits do not matter here")
    p.add_argument("--direct", action="store_true",
                   help="first a wave straight at the upstream (no node): what the generator and upstream add")
    p.add_argument("--load", choices=("native", "python"), default="native",
                   help="the upstream and generator: compiled from bench/sseload.c (native, the default: "
                   "they cost the shared cores least) or bench/upstream.py and this module's asyncio generator")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = _args(argv)
    modes = [m for m in a.gc.split(",") if m]
    if bad := set(modes) - set(GC_MODES):
        raise SystemExit(f"--gc takes tuned, default or both, not {sorted(bad)}")
    if a.chunks < 2:
        raise SystemExit("--chunks must be at least 2")
    raise_nofile()  # this process holds every client socket
    pin = not a.no_pin and a.workers == 1 and (os.cpu_count() or 1) >= 2
    gw_cpus = a.gateway_cpus if pin else None
    load_cpus = a.load_cpus if pin else None
    if load_cpus is not None:
        os.sched_setaffinity(0, {int(c) for c in load_cpus.split(",")})
    tmp = Path(tempfile.mkdtemp(prefix="hapax-bench-streams-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    workers: list[str] = []
    if a.workers > 1:
        if modes != ["tuned"]:
            raise SystemExit("--workers above 1 runs the tuned node only (its workers are `-m node`)")
        env["HAPAX_BENCH_UNSHARED_WORKERS"] = "1"
        workers = ["--workers", str(a.workers)]
    timeout = a.chunks * a.chunk_ms / 1000 + 60
    run = run_loop
    # The generator's own collections would show up as gaps: it keeps little, so it does without.
    gc.disable()
    up_port = free_port()
    binary = native.build(tmp) if a.load == "native" else None
    if binary is not None:
        up_argv = native.upstream_argv(binary, tmp, up_port, a.chunks, a.chunk_ms)
    else:
        up_argv = [sys.executable, "-m", "bench.upstream", "--port", str(up_port),
                   "--chunks", str(a.chunks), "--chunk-ms", str(a.chunk_ms)]
    upstream = Proc("upstream", up_argv, tmp, cpus=load_cpus, env=env)

    def generator(port: int) -> list[str] | None:
        if binary is None:
            return None
        return native.streams_argv(binary, tmp, port, _request(port), a.streams, a.ramp_s, timeout)

    waves: list[Wave] = []
    try:
        upstream.wait_port(up_port)
        if a.direct:
            own0, up0, st0 = _own_cpu(), upstream.cpu(), steal_seconds()
            results, live, wall = run(wave(up_port, a.streams, a.ramp_s, timeout, probe=False,
                                               native_argv=generator(up_port)))
            cpu = {"generator": _own_cpu() - own0, "upstream": upstream.cpu() - up0, "steal": steal_seconds() - st0}
            w = Wave("direct", results, live, wall, {}, {k: round(100 * v / wall, 1) for k, v in cpu.items()})
            waves.append(w)
            print(json.dumps(w.summary(a.chunk_ms)), flush=True)
        for mode in modes:
            port = free_port()
            cfg = tmp / f"hapax-{mode}.yaml"
            cfg.write_text(yaml.safe_dump(_config(port, up_port, a.streams)))
            prof = tmp / f"hapax-{mode}.prof"
            node_env = {**env, "HAPAX_BENCH_CPROFILE": str(prof)} if mode == "cprofile" else env
            node = Proc(f"hapax-{mode}", [a.python, *GC_MODES[mode], "serve", "--config", str(cfg), *workers],
                        tmp, cpus=gw_cpus, env=node_env, preexec_fn=raise_nofile)
            try:
                node.wait_http(f"http://127.0.0.1:{port}/health/ready")
                wait_workers(port, a.workers)
                for _ in range(a.waves):
                    before = _node_gc(port)
                    cpu0, own0, up0, st0 = node.cpu(), _own_cpu(), upstream.cpu(), steal_seconds()
                    results, live, wall = run(wave(port, a.streams, a.ramp_s, timeout,
                                                       native_argv=generator(port)))
                    cpu = {"node": node.cpu() - cpu0, "generator": _own_cpu() - own0,
                           "upstream": upstream.cpu() - up0, "steal": steal_seconds() - st0}
                    after = _node_gc(port)
                    node.check()
                    w = Wave(mode, results, live, wall,
                             {k: after[k] - before.get(k, 0.0) for k in after},
                             {k: round(100 * v / wall, 1) for k, v in cpu.items()})
                    waves.append(w)
                    print(json.dumps(w.summary(a.chunk_ms)), flush=True)
            finally:
                node.stop()
            if mode == "cprofile" and prof.exists():
                import pstats

                pstats.Stats(str(prof)).sort_stats("tottime").print_stats(30)
    finally:
        upstream.stop()
    print()
    print(f"{a.streams} streams, {a.chunks} chunks every {a.chunk_ms:g} ms, started over {a.ramp_s:g} s")
    print(render([w.summary(a.chunk_ms) for w in waves]))
    if not a.no_save:
        results_dir = ROOT / "bench" / "results"
        results_dir.mkdir(exist_ok=True)
        out = results_dir / f"streams-{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(json.dumps({"settings": vars(a), "waves": [w.summary(a.chunk_ms) for w in waves]},
                                  indent=2))
        print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


_GEN2_N = 'python_gc_collections_total{generation="2"}'
_GEN2_PAUSE = 'python_gc_pause_seconds_sum{generation="2"}'


def render(rows: list[dict[str, Any]]) -> str:
    head = (f"{'gc':<8} {'ok':>6} {'errors':>6} {'gap p50':>8} {'gap p99':>8} {'gap max':>8} "
            f"{'first p50':>9} {'first p99':>9} {'live max':>8} {'gen2 n':>6} {'gen2 pause s':>12} "
            f"{'node %':>6} {'gen %':>5} {'up %':>5} {'steal %':>7} {'node us/event':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r["node_gc"]
        lines.append(
            f"{r['gc']:<8} {r['ok']:>6} {sum(r['errors'].values()):>6} {_f(r['worst_gap_ms_p50'])} "
            f"{_f(r['worst_gap_ms_p99'])} {_f(r['worst_gap_ms_max'])} {_f(r['first_event_ms_p50'], 9)} "
            f"{_f(r['first_event_ms_p99'], 9)} {_f(r['health_live_ms_max'])} "
            f"{g.get(_GEN2_N, 0):>6.0f} {g.get(_GEN2_PAUSE, 0):>12.3f} "
            f"{r['core_pct'].get('node', 0):>6.0f} {r['core_pct'].get('generator', 0):>5.0f} "
            f"{r['core_pct'].get('upstream', 0):>5.0f} {r['core_pct'].get('steal', 0):>7.0f} "
            f"{_f(r['node_cpu_us_per_event'], 13)}"
        )
    for i, r in enumerate(rows, 1):
        if late := r.get("late_gaps_by_second"):
            lines.append(f"row {i}: streams whose worst gap passed 1.5 intervals, by the second it ended in: "
                         + ", ".join(f"{sec} s: {n}" for sec, n in late.items()))
    lines.append("(ms; gap = a stream's worst interval between two event reads; first = request sent -> first event;\n"
                 " %: of one core over the wave; steal: CPU the hypervisor gave to other guests meanwhile)")
    return "\n".join(lines)


def _f(v: float | None, w: int = 8) -> str:
    return "-".rjust(w) if v is None else f"{v:>{w}.0f}"
