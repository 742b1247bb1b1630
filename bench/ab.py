"""``python -m bench.ab --before DIR --after DIR``: two trees' nodes, alternately, in one run.

Both nodes (and, with ``--proxy``, the bare proxy) run side by side against one
fast upstream, with the same generated config; wrk loads them in turn,
``--rounds`` times, so a machine that other work slows down slows both alike.
The figure that decides is CPU per request of the server process (utime+stime
from /proc, all threads), which a loaded machine inflates much less than it
inflates latency; p50 is reported beside it. Each tree's node runs from that
tree (cwd and PYTHONPATH), the upstream, proxy and wrk from this one.

    python -m bench.ab --before /tmp/old --after .              # non-streaming, c=50
    python -m bench.ab --before /tmp/old --after . --mode stream --proxy
    python -m bench.ab --before /tmp/good --after /tmp/bisect --fail-above 15   # for git bisect run
    python -m bench.ab --before /tmp/old --after . --mode slow --streams 500  # CPU per relayed event

``--fail-above PCT`` exits 1 when the after tree's median CPU per request is
more than PCT % above the before tree's (0 otherwise), and 125 when the after
tree's node does not start, which ``git bisect run`` reads as "skip".
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import streams, wrk
from .procs import ROOT, Proc, free_port, system_busy_seconds
from .run import BENCH_LIMITS, _hapax_config, _sanity

SKIP = 125  # git bisect run: this commit cannot be tested


@dataclass
class Side:
    name: str
    url: str
    proc: Proc
    cpu_us: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)

    def median_cpu(self) -> float:
        return statistics.median(self.cpu_us)

    def median_p50(self) -> float:
        return statistics.median(self.p50_ms)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="the tree measured as 'before'")
    p.add_argument("--after", default=ROOT, type=Path, help="the tree measured as 'after' (this one)")
    p.add_argument("--mode", choices=("nonstream", "stream", "slow"), default="nonstream",
                   help="wrk non-streaming or streaming calls, or 'slow': --streams concurrent streams whose "
                   "chunks the upstream writes --chunk-ms apart (bench streams), CPU per relayed event")
    p.add_argument("--streams", type=int, default=500, help="slow mode: concurrent streams per wave (500)")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="slow mode: ms between a stream's chunks")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--pace-ms", type=float, default=0.0,
                   help="each wrk connection waits a random 0 to twice this many ms between requests (as "
                   "python -m bench --pace-ms): latency below saturation (0: none)")
    p.add_argument("--rounds", type=int, default=4, help="alternations before/after (4)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per target per round (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (1)")
    p.add_argument("--access-log", choices=("on", "off"), default="on", help="both nodes alike (on)")
    p.add_argument("--before-access-log", choices=("on", "off"),
                   help="the before node's alone (to reproduce two benches' different defaults)")
    p.add_argument("--proxy", action="store_true", help="load the bare proxy each round too")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--python", default=sys.executable, help="interpreter of both nodes and the proxy")
    p.add_argument("--gateway-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--state", choices=("memory", "redis"),
                   help="give both nodes the benchmark's never-refusing global limits, kept in memory or in a "
                   "redis-server started on the load CPUs (a cluster per node); unset: no limits")
    p.add_argument("--dedup", choices=("on", "off"), default="on", help="reliability.dedup.enabled, both nodes (on)")
    p.add_argument("--fail-above", type=float, help="exit 1 if after's CPU/req is > PCT %% above before's")
    return p.parse_args(argv)


def _log_on(a: argparse.Namespace, name: str) -> bool:
    if name == "before" and a.before_access_log is not None:
        return bool(a.before_access_log == "on")
    return bool(a.access_log == "on")


def _start_node(name: str, tree: Path, cfg: Path, tmp: Path, python: str, cpus: str | None) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    return Proc(name, [python, "-m", "node", "serve", "--config", str(cfg)], tmp, cpus=cpus, env=env, cwd=tree,
                preexec_fn=streams.raise_nofile)


def _measure_slow(side: Side, a: argparse.Namespace) -> str:
    """One wave of ``--streams`` slow streams: the node's CPU per relayed event, and the stream percentiles."""
    port = int(side.url.split(":")[2].split("/")[0])
    timeout = a.chunks * a.chunk_ms / 1000 + 60
    cpu0, sw0, sys0 = side.proc.cpu(), _switches(side.proc.pid), _system_cpu(side.proc.pid)
    results, _live, wall = streams.run_loop(streams.wave(port, a.streams, 1.0, timeout))
    cpu1, sw1, sys1 = side.proc.cpu(), _switches(side.proc.pid), _system_cpu(side.proc.pid)
    side.proc.check()
    bad = [r.error for r in results if r.error]
    if bad:
        raise RuntimeError(f"{side.name}: {len(bad)} streams failed, e.g. {bad[0]}")
    events = sum(r.events for r in results)
    us = (cpu1 - cpu0) * 1e6 / max(1, events)
    gaps = sorted(r.worst_gap_s * 1000 for r in results)
    firsts = sorted((r.first_event_s or 0.0) * 1000 for r in results)
    gap99, first50 = streams.pct(gaps, 99) or 0.0, streams.pct(firsts, 50) or 0.0
    first99 = streams.pct(firsts, 99) or 0.0
    side.cpu_us.append(us)
    side.p50_ms.append(first50)
    side.p99_ms.append(gap99)
    side.rps.append(events / wall)
    kernel = (sys1 - sys0) * 1e6 / max(1, events)
    core = 100 * (cpu1 - cpu0) / wall
    return (f"{side.name:<7} {events:>7} events  CPU {us:>6.1f} us/event (kernel {kernel:.1f})  core {core:>4.0f} %  "
            f"gap p99 {gap99:>5.0f} ms  first p50/p99 {first50:>5.0f}/{first99:>5.0f} ms  "
            f"switches/event vol {(sw1[0] - sw0[0]) / max(1, events):.2f}")


def _switches(pid: int) -> tuple[int, int, int]:
    """Voluntary and involuntary context switches of all the process's threads, and how many threads."""
    vol = invol = threads = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
            threads += 1
        except OSError:
            continue  # a thread that ended meanwhile
    return vol, invol, threads


def _system_cpu(pid: int) -> float:
    """The process's system (kernel) CPU seconds: its syscalls, loopback TCP included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[12]) / os.sysconf("SC_CLK_TCK")


def _measure(side: Side, script: Path, a: argparse.Namespace, load_cpus: str | None) -> str:
    kw: dict[str, Any] = {"connections": a.connections, "threads": 1, "cpus": load_cpus}
    if a.warmup > 0:
        wrk.run(side.url, script, duration=a.warmup, **kw)
    cpu0, sys0, sw0 = side.proc.cpu(), system_busy_seconds(), _switches(side.proc.pid)
    res, _ = wrk.run(side.url, script, duration=a.duration, **kw)
    cpu1, sys1, sw1 = side.proc.cpu(), system_busy_seconds(), _switches(side.proc.pid)
    side.proc.check()
    if res.non_2xx or res.errors_connect or res.errors_read or res.errors_timeout:
        raise RuntimeError(f"{side.name}: errors in the run: {res.as_dict()}")
    n = max(1, res.requests)
    us = (cpu1 - cpu0) * 1e6 / n
    side.cpu_us.append(us)
    side.p50_ms.append(res.p50_ms)
    side.p99_ms.append(res.p99_ms)
    side.rps.append(res.rps)
    busy = 100 * (sys1 - sys0) / max(1e-9, res.duration_s)
    core = 100 * (cpu1 - cpu0) / max(1e-9, res.duration_s)
    return (f"{side.name:<7} {res.rps:>8.0f} req/s  p50 {res.p50_ms:>7.2f} ms  p99 {res.p99_ms:>7.2f} ms  "
            f"CPU {us:>6.0f} us/req  core {core:>4.0f} %  machine busy {busy:>4.0f} % of a core  "
            f"switches/req vol {(sw1[0] - sw0[0]) / n:.2f} invol {(sw1[1] - sw0[1]) / n:.2f}  threads {sw1[2]}")


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    gw, load = (a.gateway_cpus, a.load_cpus) if pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="hapax-ab-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    up_port = free_port()
    script = wrk.write_script(tmp, a.mode == "stream", pace_ms=a.pace_ms)
    slow = a.mode == "slow"
    up_extra = ["--chunk-ms", str(a.chunk_ms)] if slow else []
    if slow:
        streams.raise_nofile()  # this process holds every client socket
        if load is not None:
            os.sched_setaffinity(0, {int(c) for c in load.split(",")})
        gc.disable()  # the generator's own collections would show up as gaps
    procs: list[Proc] = []
    sides: list[Side] = []
    try:
        up = Proc("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(up_port),
                               "--chunks", str(a.chunks), *up_extra], tmp, cpus=load, env=env)
        procs.append(up)
        up.wait_port(up_port)
        redis_url = None
        if a.state == "redis":
            rport = free_port()
            rs = Proc("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp)], tmp, cpus=load, env=env)
            procs.append(rs)
            rs.wait_port(rport)
            redis_url = f"redis://127.0.0.1:{rport}/0"
        if a.proxy:
            port = free_port()
            proxy = Proc("proxy", [a.python, "-m", "bench.proxy", "--port", str(port),
                                   "--upstream", f"http://127.0.0.1:{up_port}"], tmp, cpus=gw, env=env)
            procs.append(proxy)
            proxy.wait_port(port)
            sides.append(Side("proxy", f"http://127.0.0.1:{port}/v1/chat/completions", proxy))
        for name, tree in (("before", a.before.resolve()), ("after", a.after.resolve())):
            port = free_port()
            cfg = tmp / f"{name}.yaml"
            pool = a.streams + 100 if slow else max(100, a.connections)
            c = _hapax_config(port, up_port, pool, access_log=_log_on(a, name))
            if a.state is not None:
                c["limits"] = BENCH_LIMITS
            if redis_url is not None:
                c["state"] = {"cluster": name, "redis": {"url": redis_url}}
            if a.dedup == "off":
                c["reliability"] = {"dedup": {"enabled": False}}
            cfg.write_text(yaml.safe_dump(c))
            node = _start_node(name, tree, cfg, tmp, a.python, gw)
            procs.append(node)
            try:
                node.wait_http(f"http://127.0.0.1:{port}/health/ready")
            except RuntimeError as exc:
                print(f"{name} ({tree}) did not start: {exc}", file=sys.stderr)
                return SKIP if name == "after" else 2
            sides.append(Side(name, f"http://127.0.0.1:{port}/v1/chat/completions", node))
        if not slow:
            for s in sides:
                _sanity(s.name, s.url, a.chunks)
        print(f"{a.mode}, c={a.connections}" + (f", paced {a.pace_ms:g} ms" if a.pace_ms else "")
              + f", access log {a.access_log}, state {a.state or 'none'}, "
              f"dedup {a.dedup}, {a.rounds} rounds of "
              f"{a.duration:g}s; before {a.before}, after {a.after}", flush=True)
        for r in range(a.rounds):
            # Alternate the order too, so neither side always runs right after the proxy.
            order = sides if r % 2 == 0 else [sides[0], *reversed(sides[1:])] if a.proxy else sides[::-1]
            for s in order:
                line = _measure_slow(s, a) if slow else _measure(s, script, a, load)
                print(f"round {r + 1}  " + line, flush=True)
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            p.stop()

    by = {s.name: s for s in sides}
    unit, lat, rate = ("us/event", "first event p50", "events/s") if slow else ("us/req", "p50", "req/s")
    print()
    for s in sides:
        extra = f"  gap p99 {statistics.median(s.p99_ms):>5.0f} ms" if slow else ""
        print(f"{s.name:<7} median CPU {s.median_cpu():>6.1f} {unit}  {lat} {s.median_p50():>7.2f} ms{extra}  "
              f"{rate} {statistics.median(s.rps):>7.0f}   (CPU per round: "
              + " ".join(f"{v:.1f}" for v in s.cpu_us) + ")")
    before, after = by["before"], by["after"]
    # Per-round ratios pair measurements seconds apart, so they share the machine's state then.
    paired_cpu = statistics.median(x / y for x, y in zip(after.cpu_us, before.cpu_us, strict=True))
    paired_p50 = statistics.median(x / y for x, y in zip(after.p50_ms, before.p50_ms, strict=True))
    line = (f"after/before: CPU {after.median_cpu() / before.median_cpu():.3f} (paired {paired_cpu:.3f})  "
            f"{lat} {after.median_p50() / before.median_p50():.3f} (paired {paired_p50:.3f})")
    if "proxy" in by:
        px = by["proxy"]
        line += "   vs proxy: CPU/req " + " -> ".join(
            f"{s.median_cpu() / px.median_cpu():.2f}" for s in (before, after)
        ) + "  p50 " + " -> ".join(f"{s.median_p50() / px.median_p50():.2f}" for s in (before, after))
    print(line)
    if a.fail_above is not None:
        return 1 if after.median_cpu() > before.median_cpu() * (1 + a.fail_above / 100) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
