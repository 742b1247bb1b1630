"""``python -m bench``: upstream direct vs a bare aiohttp proxy vs Hapax, in one run.

See bench/README.md. Every load is wrk against 127.0.0.1, bounded by --duration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import native, profile, wrk
from .procs import (
    ROOT,
    Proc,
    children_cpu_seconds,
    free_port,
    interpreter_info,
    system_busy_seconds,
    wait_listeners,
    wait_workers,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("direct", "proxy", "hapax")
#: ``--access-log`` value -> the Hapax target it runs: ``hapax`` logs as users run it, ``hapax-nolog`` not.
HAPAX_VARIANTS = {"on": "hapax", "off": "hapax-nolog"}
MODES = ("nonstream", "stream")
#: ``--state`` value -> suffix of the Hapax target that keeps its limits there.
STATE_VARIANTS = {"memory": "", "redis": "-redis"}
#: Limits every Hapax target gets under ``--state``: never refusing, always checked and settled.
BENCH_LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "concurrent": 10**6}


@dataclass
class Row:
    mode: str
    connections: int
    target: str
    wrk: wrk.WrkResult
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: Which pass over the targets (``--rounds``) measured it, from 0.
    round: int = 0
    #: Reads redis-server processed during the run (its ``total_reads_processed``): round trips.
    redis_reads: int | None = None
    #: Involuntary context switches of the process under test (all its workers) during the run.
    preempted: int | None = None
    #: The node's own view of them: ``hapax_redis_round_trip_seconds`` sum and count over the run.
    redis_trips: tuple[float, float] | None = None

    def redis_rtt_ms(self) -> float | None:
        if self.redis_trips is None or not self.redis_trips[1]:
            return None
        return self.redis_trips[0] / self.redis_trips[1] * 1000

    def redis_per_request(self) -> tuple[float, float] | None:
        """For a target on Redis state: redis-server's CPU µs and reads (round trips) per request."""
        s = self.cpu_s.get("redis")
        if s is None or self.redis_reads is None or not self.target.startswith("hapax-redis") or not self.wrk.requests:
            return None
        return s * 1e6 / self.wrk.requests, self.redis_reads / self.wrk.requests

    def server_cpu_us(self) -> float | None:
        """µs of CPU per request in the process under test (the upstream itself for ``direct``)."""
        name = "upstream" if self.target == "direct" else self.target
        s = self.cpu_s.get(name)
        return s * 1e6 / self.wrk.requests if s is not None and self.wrk.requests else None

    def upstream_cpu_us(self) -> float | None:
        s = self.cpu_s.get("upstream")
        return s * 1e6 / self.wrk.requests if s is not None and self.wrk.requests else None

    def core_util(self) -> float | None:
        name = "upstream" if self.target == "direct" else self.target
        s = self.cpu_s.get(name)
        return 100 * s / self.wrk.duration_s if s is not None and self.wrk.duration_s else None

    def foreign_pct(self) -> float | None:
        """CPU used by processes outside the benchmark during the run, in % of one core."""
        s = self.cpu_s.get("foreign")
        return 100 * s / self.wrk.duration_s if s is not None and self.wrk.duration_s else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "connections": self.connections,
            "target": self.target,
            "round": self.round,
            "wrk": self.wrk.as_dict(),
            "cpu_seconds": self.cpu_s,
            "server_cpu_us_per_request": self.server_cpu_us(),
            "upstream_cpu_us_per_request": self.upstream_cpu_us(),
            "server_core_utilisation_pct": self.core_util(),
            "foreign_cpu_pct_of_one_core": self.foreign_pct(),
            "redis_reads": self.redis_reads,
            "preemptions": self.preempted,
            "redis_round_trips": self.redis_trips,
            "redis_round_trip_mean_ms": self.redis_rtt_ms(),
        }


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load per target (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each (2)")
    p.add_argument("--connections", default="50", help="wrk connections; a comma list runs each (50)")
    p.add_argument("--only", choices=MODES, help="run only non-streaming or only streaming")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of direct,proxy,hapax")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per upstream stream (20)")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for Hapax and the proxy (needs the deps importable; see README)",
    )
    p.add_argument("--gateway-cpus", default="1", help="taskset list for Hapax and the proxy (1)")
    p.add_argument("--load-cpus", default="0", help="taskset list for the upstream and wrk (0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument(
        "--profile",
        choices=("py-spy", "cprofile"),
        help="after the runs, profile Hapax under the same load for --profile-duration",
    )
    p.add_argument("--profile-duration", type=float, default=10.0)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each measured run, wait up to this many seconds for other work on the machine "
        "to drop under 10%% of a core (60; 0 disables)",
    )
    p.add_argument(
        "--auth",
        choices=("none", "keys"),
        default="none",
        help="Hapax's auth mode; 'keys' calls with a stored key that has rate limits and a budget (none)",
    )
    p.add_argument(
        "--access-log",
        default="on",
        help="Hapax's access log: on (default, as operators run it), off, or on,off to run both "
        "nodes side by side in one run (target 'hapax-nolog' is the one without)",
    )
    p.add_argument(
        "--state",
        help="memory, redis or memory,redis: give every Hapax target global limits (never refusing) kept "
        "in process memory or in a redis-server the bench starts on the load CPUs ('hapax-redis'); "
        "unset: no limits, as before",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="Hapax worker processes; a comma list (1,2) runs a node per count in one run (targets "
        "hapax, hapax-w2, ...). Above 1 nothing is pinned (the workers need every core). On memory state "
        "each worker keeps its own (HAPAX_BENCH_UNSHARED_WORKERS): the bench's limits never refuse; with "
        "--state redis the workers share Redis as in production (targets hapax-redis, hapax-redis-w2, ...)",
    )
    p.add_argument(
        "--dedup",
        choices=("on", "off"),
        default="on",
        help="reliability.dedup.enabled on every Hapax target: on (the default, as users run it) or off, "
        "to tell what in-flight dedup's shared state costs apart from the access state's (on)",
    )
    p.add_argument(
        "--pace-ms",
        type=float,
        default=0.0,
        help="each wrk connection waits a random 0 to twice this many ms after a response before its next "
        "request, keeping the load under saturation so p50/p99 are a request's own latency, not queueing "
        "(0: none)",
    )
    p.add_argument(
        "--upstream", choices=("python", "native"), default="python",
        help="the canned upstream: bench/upstream.py (python, the default) or the same replies from "
        "bench/sseload.c (native: about a third of the CPU per request, which --workers 1,2 then leaves "
        "to the node)",
    )
    p.add_argument(
        "--rounds", type=int, default=1,
        help="passes over the targets per mode and connection count, in alternating order; the ratios "
        "are taken within each pass and their median printed (1). On a shared VM one pass can swing 2x; "
        "a ratio of two targets measured seconds apart, repeated, is the figure to read",
    )
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<timestamp>.json")
    return p.parse_args(argv)


def _hapax_config(port: int, upstream_port: int, pool: int, *, access_log: bool = True) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        # The defaults (info, JSON, access log on) are how operators run it; the lines go to a file.
        "logging": {"level": "info", "access_log": access_log},
        "providers": {
            "bench": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key": "sk-upstream-bench",
                "pool_size": pool,
            }
        },
        "models": [{"name": wrk.MODEL, "provider": "bench", "model": "bench-upstream-model"}],
    }


def _keys_mode(state: Path, python: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """``auth.mode: keys`` config and the key the load will use: limits and a budget high
    enough never to refuse, so every request pays for the whole check-and-settle path."""
    auth = {"mode": "keys", "admin_key": "bench-admin-" + "x" * 40, "state_dir": str(state)}
    out = subprocess.run(
        [python, "-m", "node", "keys", "create", "--state-dir", str(state), "--name", "bench",
         "--team", "bench", "--rpm", "1000000000", "--tpm", "1000000000000", "--concurrent", "100000",
         "--daily-usd", "1000000000", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return auth, str(json.loads(out)["key"])


def _post(url: str, stream: bool, api_key: str = wrk.API_KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url,
        data=wrk.request_body(stream),
        headers={"content-type": "application/json", "authorization": f"Bearer {api_key}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def _sanity(name: str, url: str, chunks: int, api_key: str = wrk.API_KEY) -> None:
    status, body = _post(url, False, api_key)
    data = json.loads(body)
    if status != 200 or not data.get("choices"):
        raise RuntimeError(f"{name}: bad non-streaming reply {status}: {body[:300]!r}")
    status, body = _post(url, True, api_key)
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    if status != 200 or events[-1] != b"data: [DONE]" or len(events) != chunks + 2:
        raise RuntimeError(f"{name}: bad stream ({status}, {len(events)} events): {body[:300]!r}")


def _wait_quiet(procs: dict[str, Proc], limit_s: float) -> float:
    """Wait (up to ``limit_s``) until CPU used outside our processes is under 10% of a core."""
    t0 = time.monotonic()
    while True:
        ours0, sys0 = sum(p.cpu() for p in procs.values()), system_busy_seconds()
        time.sleep(1.0)
        foreign = (system_busy_seconds() - sys0) - (sum(p.cpu() for p in procs.values()) - ours0)
        waited = time.monotonic() - t0
        if foreign < 0.10 or waited >= limit_s:
            return waited


def redis_reads(port: int) -> int | None:
    """redis-server's ``total_reads_processed``: one per read of a client's socket, so per batch."""
    try:
        out = subprocess.run(["redis-cli", "-p", str(port), "info", "stats"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("total_reads_processed:"):
            return int(line.split(":", 1)[1])
    return None


def redis_trips(url: str) -> tuple[float, float] | None:
    """The node's ``hapax_redis_round_trip_seconds`` sum and count (``url`` is its chat URL)."""
    base = url.split("/v1/", 1)[0]
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"hapax_redis_round_trip_seconds_{part} "):
                found[part] = float(line.split()[1])
    return (found["sum"], found["count"]) if len(found) == 2 else None


def _git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and the files under hapax/ and node/ changed since (read-only git)."""
    import subprocess

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    try:
        return {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--porcelain", "--", "hapax", "node").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {}


def _fmt(v: float | None, spec: str) -> str:
    # A missing figure keeps the column's alignment and width: ">10.0f" -> ">10".
    return format("-", spec.split(".")[0]) if v is None else format(v, spec)


def render(rows: list[Row]) -> str:
    head = (
        f"{'mode':<10} {'conns':>5} {'target':<14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>10} {'core %':>6} {'upstr us/req':>12} {'errors':>6} {'foreign %':>9} {'preempt/req':>11}"
    )
    shared = any(r.redis_per_request() for r in rows)
    if shared:
        head += f" {'redis us/req':>12} {'trips/req':>9} {'trip ms':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        w = r.wrk
        errs = w.errors_connect + w.errors_read + w.errors_write + w.errors_timeout + w.non_2xx
        line = (
            f"{r.mode:<10} {r.connections:>5} {r.target:<14} {w.rps:>9.0f} {w.p50_ms:>8.2f} {w.p99_ms:>8.2f} "
            f"{_fmt(r.server_cpu_us(), '>10.0f')} {_fmt(r.core_util(), '>6.0f')} "
            f"{_fmt(r.upstream_cpu_us(), '>12.0f')} {errs:>6} {_fmt(r.foreign_pct(), '>9.0f')} "
            f"{_fmt(r.preempted / w.requests if r.preempted is not None and w.requests else None, '>11.3f')}"
        )
        if shared:
            per = r.redis_per_request()
            line += (f" {_fmt(per[0] if per else None, '>12.0f')} {_fmt(per[1] if per else None, '>9.2f')}"
                     f" {_fmt(r.redis_rtt_ms(), '>7.2f')}")
        lines.append(line)
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Per mode, connection count and round: the figures that compare targets measured in one pass."""
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, int, int], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.connections, r.round), {})[r.target] = r
    for (mode, conns, rnd), g in groups.items():
        h = g.get("hapax") or g.get("hapax-nolog") or g.get("hapax-redis")
        if h is None:
            continue
        entry: dict[str, Any] = {"mode": mode, "connections": conns, "round": rnd}
        on, off = g.get("hapax"), g.get("hapax-nolog")
        if on is not None and off is not None and (c_on := on.server_cpu_us()) and (c_off := off.server_cpu_us()):
            entry["access_log_cpu_us_per_request"] = c_on - c_off
        red = g.get("hapax-redis")
        if on is not None and red is not None and (c_on := on.server_cpu_us()) and (c_red := red.server_cpu_us()):
            entry["redis_state_cpu_us_per_request"] = c_red - c_on
            entry["redis_state_p50_added_ms"] = red.wrk.p50_ms - on.wrk.p50_ms
            entry["redis_state_p99_added_ms"] = red.wrk.p99_ms - on.wrk.p99_ms
        for base in ("direct", "proxy"):
            b = g.get(base)
            if b is None or not b.wrk.rps:
                continue
            entry[f"rps_hapax_over_{base}"] = h.wrk.rps / b.wrk.rps
            entry[f"p50_added_vs_{base}_ms"] = h.wrk.p50_ms - b.wrk.p50_ms
            entry[f"p99_added_vs_{base}_ms"] = h.wrk.p99_ms - b.wrk.p99_ms
        for t, r in g.items():
            # hapax-w2 over hapax (memory state), hapax-redis-w2 over hapax-redis (shared state),
            # proxy-w2 over proxy (the yardstick: how far any aiohttp server scales here).
            stem, sep, count = t.rpartition("-w")
            one = g.get(stem) if sep and count.isdigit() and stem.startswith(("hapax", "proxy")) else None
            if one is not None and one.wrk.rps:
                kind = stem.removeprefix("hapax").lstrip("-")
                entry[f"rps_{kind + '_' if kind else ''}w{count}_over_w1"] = r.wrk.rps / one.wrk.rps
                if (c1 := one.server_cpu_us()) and (cn := r.server_cpu_us()):
                    entry[f"cpu_{kind + '_' if kind else ''}w{count}_over_w1"] = cn / c1
        p, hc = g.get("proxy"), h.server_cpu_us()
        if p is not None and hc is not None and (pc := p.server_cpu_us()):
            entry["cpu_per_request_hapax_over_proxy"] = hc / pc
        out.append(entry)
    return out


def medians(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Over rounds, per mode and connection count: each figure's median, and its range."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for e in rs:
        groups.setdefault((e["mode"], e["connections"]), []).append(e)
    out: list[dict[str, Any]] = []
    for (mode, conns), es in groups.items():
        if len(es) < 2:
            continue
        entry: dict[str, Any] = {"mode": mode, "connections": conns, "rounds": len(es)}
        for k in es[0]:
            vals = [e[k] for e in es if isinstance(e.get(k), float)]
            if vals:
                entry[k] = statistics.median(vals)
                entry[k + "_range"] = (min(vals), max(vals))
        out.append(entry)
    return out


def render_ratios(rs: list[dict[str, Any]]) -> str:
    lines = []
    for e in rs:
        rounds = e.get("rounds")
        label = f"median of {rounds}" if rounds else (f"round {e['round'] + 1}" if "round" in e else "")
        parts = [f"{e['mode']:<10} c={e['connections']:<4}{label:<13}"]
        if "rps_hapax_over_direct" in e:
            parts.append(f"req/s Hapax/direct {e['rps_hapax_over_direct']:.2f}")
            parts.append(f"p50 +{e['p50_added_vs_direct_ms']:.2f} ms vs direct")
        if "rps_hapax_over_proxy" in e:
            parts.append(f"req/s Hapax/proxy {e['rps_hapax_over_proxy']:.2f}")
            parts.append(f"p50 {e['p50_added_vs_proxy_ms']:+.2f} ms vs proxy")
        if "cpu_per_request_hapax_over_proxy" in e:
            parts.append(f"CPU/req Hapax/proxy {e['cpu_per_request_hapax_over_proxy']:.2f}")
        for k, v in e.items():
            if k.startswith("rps_") and k.endswith("_over_w1"):
                name = k[4:-8].replace("_", " ")
                cpu = e.get("cpu_" + k[4:])
                spread = e.get(k + "_range")
                parts.append(f"req/s {name}/w1 {v:.2f}" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
                             + (f", CPU/req {cpu:.2f}" if cpu else ""))
        if "access_log_cpu_us_per_request" in e:
            parts.append(f"access log {e['access_log_cpu_us_per_request']:+.0f} us/req")
        if "redis_state_cpu_us_per_request" in e:
            spread = e.get("redis_state_cpu_us_per_request_range")
            parts.append(f"Redis state vs memory {e['redis_state_cpu_us_per_request']:+.0f} us/req"
                         + (f" ({spread[0]:+.0f} to {spread[1]:+.0f})" if spread else "")
                         + f", p50 {e['redis_state_p50_added_ms']:+.2f} ms"
                         + f", p99 {e['redis_state_p99_added_ms']:+.2f} ms")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def _describe(info: dict[str, Any]) -> str:
    version = str(info["version"]).split()[0]
    flags = ",".join(f for f in ("pgo", "lto") if info.get(f)) or (
        "pgo/lto not visible in sysconfig (distro build)" if info["kind"] == "debian" else "no pgo/lto")
    return f"{info['kind']} Python {version} ({info['realpath']}; {flags}; uvloop {info['modules']['uvloop']})"


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    targets = [t for t in a.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    logs = [v for v in a.access_log.split(",") if v]
    if bad := set(logs) - set(HAPAX_VARIANTS):
        raise SystemExit(f"--access-log takes on, off or on,off, not {sorted(bad)}")
    states = [v for v in (a.state or "memory").split(",") if v]
    if bad := set(states) - set(STATE_VARIANTS):
        raise SystemExit(f"--state takes memory, redis or memory,redis, not {sorted(bad)}")
    worker_counts = [int(w) for w in str(a.workers).split(",") if w]
    if not worker_counts or any(w < 1 for w in worker_counts):
        raise SystemExit("--workers takes counts of at least 1")
    #: Each multi-worker target: its worker count (access log on), one per --state (hapax-w2, hapax-redis-w2).
    multi = {f"hapax{STATE_VARIANTS[v]}-w{w}": w for w in worker_counts if w > 1 for v in states}
    #: The bare proxy with as many processes: how far workers scale on this machine at all.
    proxy_multi = {f"proxy-w{w}": w for w in worker_counts if w > 1} if "proxy" in targets else {}
    if a.rounds < 1:
        raise SystemExit("--rounds takes a count of at least 1")
    if "hapax" in targets:
        i = targets.index("hapax")
        # The log variants run on memory state; Redis state runs as users run it (log on).
        one = [HAPAX_VARIANTS[v] for v in logs if "memory" in states or v != "on"] + [
            "hapax" + STATE_VARIANTS[v] for v in states if v != "memory"
        ]
        targets[i : i + 1] = (one if 1 in worker_counts else []) + list(multi)
    if proxy_multi:
        i = targets.index("proxy")
        targets[i : i + 1] = (["proxy"] if 1 in worker_counts else []) + list(proxy_multi)
    modes = [a.only] if a.only else list(MODES)
    conns_list = [int(c) for c in str(a.connections).split(",")]
    ncpu = os.cpu_count() or 1
    pin = not a.no_pin and ncpu >= 2 and not multi and not proxy_multi
    gw_cpus = a.gateway_cpus if pin else None
    load_cpus = a.load_cpus if pin else None

    gw_info = interpreter_info(a.python)
    bench_info = interpreter_info(sys.executable)
    print(f"gateway/proxy interpreter: {_describe(gw_info)}")
    print(f"upstream interpreter:      {_describe(bench_info)}")
    pinning = f"gateway+proxy on CPU {a.gateway_cpus}, upstream+wrk on CPU {a.load_cpus}" if pin else "none"
    print(f"pinning: {pinning}")

    tmp = Path(tempfile.mkdtemp(prefix="hapax-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    up_port, proxy_port = free_port(), free_port()
    proxy_ports = {"proxy": proxy_port, **{name: free_port() for name in proxy_multi}}
    hapax_ports = {name: free_port() for name in (*HAPAX_VARIANTS.values(), "hapax-redis", *multi)}
    redis_port = free_port()
    pool = max(100, max(conns_list))
    cfg_paths: dict[str, Path] = {}
    auth: dict[str, Any] | None = None
    api_key = wrk.API_KEY
    if a.auth == "keys":  # one key store, shared by both nodes
        auth, api_key = _keys_mode(tmp / "state", a.python, env)
    for name, port in hapax_ports.items():
        cfg = _hapax_config(port, up_port, pool, access_log=name != "hapax-nolog")
        if auth is not None:
            cfg["auth"] = auth
        if a.state is not None:
            cfg["limits"] = BENCH_LIMITS
        if a.dedup == "off":
            cfg["reliability"] = {"dedup": {"enabled": False}}
        if name.startswith("hapax-redis"):
            cfg["state"] = {"cluster": "bench", "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"}}
        cfg_paths[name] = tmp / f"{name}.yaml"
        cfg_paths[name].write_text(yaml.safe_dump(cfg))
    scripts = {m: wrk.write_script(tmp, m == "stream", api_key, pace_ms=a.pace_ms) for m in MODES}
    urls = {
        "direct": f"http://127.0.0.1:{up_port}/v1/chat/completions",
        **{name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in proxy_ports.items()},
        **{name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in hapax_ports.items()},
    }
    procs: dict[str, Proc] = {}
    rows: list[Row] = []
    profiles: dict[str, Any] = {}
    started = dt.datetime.now().astimezone()
    try:
        if a.upstream == "native":
            up_argv = native.upstream_argv(native.build(tmp), tmp, up_port, a.chunks, 0.0)
        else:
            up_argv = [sys.executable, "-m", "bench.upstream", "--port", str(up_port), "--chunks", str(a.chunks)]
        procs["upstream"] = Proc("upstream", up_argv, tmp, cpus=load_cpus, env=env)
        procs["upstream"].wait_port(up_port)
        if any(t.startswith("hapax-redis") for t in targets):
            procs["redis"] = Proc(
                "redis",
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)],
                tmp, cpus=load_cpus, env=env,
            )
            procs["redis"].wait_port(redis_port)
        for name, port in proxy_ports.items():
            if name in targets:
                count = proxy_multi.get(name, 1)
                procs[name] = Proc(
                    name,
                    [a.python, "-m", "bench.proxy", "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}",
                     "--workers", str(count)],
                    tmp, cpus=gw_cpus, env=env,
                )
                procs[name].wait_port(port)
                wait_listeners(port, count)
        for name, port in hapax_ports.items():
            if name in targets:
                count = multi.get(name, 1)
                extra = ["--workers", str(count)] if count > 1 else []
                unshared = count > 1 and not name.startswith("hapax-redis")
                procs[name] = Proc(
                    name, [a.python, "-m", "node", "serve", "--config", str(cfg_paths[name]), *extra], tmp,
                    cpus=gw_cpus, env={**env, "HAPAX_BENCH_UNSHARED_WORKERS": "1"} if unshared else env,
                )
                procs[name].wait_http(f"http://127.0.0.1:{port}/health/ready")
                wait_workers(port, count)
        for t in targets:
            _sanity(t, urls[t], a.chunks, api_key)

        for mode in modes:
            for conns in conns_list:
                # Each round reverses the last's order, so drift over the run falls on both sides alike.
                passes = [(rnd, t) for rnd in range(a.rounds) for t in (targets if rnd % 2 == 0 else targets[::-1])]
                for rnd, t in passes:
                    kw = {"connections": conns, "threads": min(a.wrk_threads, conns), "cpus": load_cpus}
                    if a.wait_quiet > 0:
                        _wait_quiet(procs, a.wait_quiet)
                    if a.warmup > 0:
                        wrk.run(urls[t], scripts[mode], duration=a.warmup, **kw)
                    before = {n: p.cpu() for n, p in procs.items()}
                    gw = procs.get("upstream" if t == "direct" else t)
                    pre0 = gw.preemptions() if gw is not None else None
                    reads0 = redis_reads(redis_port) if "redis" in procs else None
                    trips0 = redis_trips(urls[t]) if t.startswith("hapax-redis") else None
                    sys0, wrk0 = system_busy_seconds(), children_cpu_seconds()
                    res, _ = wrk.run(urls[t], scripts[mode], duration=a.duration, **kw)
                    sys1, wrk1 = system_busy_seconds(), children_cpu_seconds()
                    reads1 = redis_reads(redis_port) if "redis" in procs else None
                    trips1 = redis_trips(urls[t]) if t.startswith("hapax-redis") else None
                    cpu = {n: p.cpu() - before[n] for n, p in procs.items()}
                    pre = gw.preemptions() - pre0 if gw is not None and pre0 is not None else None
                    cpu["wrk"] = wrk1 - wrk0
                    # Everything busy on the machine that is not ours: other users' work skews results.
                    cpu["foreign"] = max(0.0, (sys1 - sys0) - sum(cpu.values()))
                    for p in procs.values():
                        p.check()
                    row = Row(mode, conns, t, res, cpu, round=rnd, preempted=pre,
                              redis_reads=reads1 - reads0 if reads0 is not None and reads1 is not None else None,
                              redis_trips=(trips1[0] - trips0[0], trips1[1] - trips0[1]) if trips0 and trips1 else None)
                    rows.append(row)
                    print(render([row]).splitlines()[-1], flush=True)

        hapax_proc = procs.get("hapax") or procs.get("hapax-nolog") or next(
            (p for n, p in procs.items() if n.startswith("hapax")), None)  # e.g. hapax-redis alone
        if a.profile and hapax_proc is not None:
            for mode in modes:
                conns = conns_list[-1]
                print(f"profiling Hapax ({a.profile}, {mode}, c={conns}, {a.profile_duration:.0f}s) ...", flush=True)
                profiles[mode] = profile.profile_hapax(
                    a.profile, hapax_proc, urls[hapax_proc.name], scripts[mode], tmp, mode,
                    duration=a.profile_duration, connections=conns, load_cpus=load_cpus,
                    python=a.python, cfg_path=cfg_paths[hapax_proc.name], gw_cpus=gw_cpus, env=env,
                )
    finally:
        for p in reversed(list(procs.values())):
            p.stop()

    print()
    print(f"Hapax benchmark  {started:%Y-%m-%d %H:%M %Z}  {ncpu} CPUs  {platform.node()}")
    print(f"gateway/proxy interpreter: {_describe(gw_info)}")
    print(f"  sys.version: {gw_info['version']}")
    print(f"duration {a.duration:g}s per target after {a.warmup:g}s warm-up; wrk -t{a.wrk_threads}; "
          f"stream = {a.chunks} chunks + usage + [DONE]; Hapax auth mode {a.auth}; "
          f"access log {a.access_log} (hapax-nolog: off); "
          f"state {a.state or 'memory, no limits'} (hapax-redis: Redis on the load CPUs); dedup {a.dedup}"
          + (f"; paced: {a.pace_ms:g} ms on average between a connection's requests" if a.pace_ms else ""))
    print()
    print(render(rows))
    noisy = [r for r in rows if (r.foreign_pct() or 0) > 10]
    if noisy:
        print(f"WARNING: {len(noisy)} run(s) shared the machine with other work (foreign % > 10): "
              "their figures are low; rerun when the machine is quiet.")
    print()
    rs = ratios(rows)
    summary = medians(rs)
    print(render_ratios(rs))
    if summary:
        print()
        print(render_ratios(summary))
    for mode, prof in profiles.items():
        print()
        print(f"Hapax profile ({mode}): {prof.get('summary_path')}")
        print(prof.get("text", ""))

    if not a.no_save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{started:%Y%m%dT%H%M%S}.json"
        out.write_text(json.dumps({
            "started": started.isoformat(),
            "finished": dt.datetime.now().astimezone().isoformat(),
            "source": _git_state(),
            "host": {"cpus": ncpu, "node": platform.node(), "platform": platform.platform()},
            "interpreter": {"gateway_and_proxy": gw_info, "upstream_and_bench": bench_info},
            "settings": {
                "duration_s": a.duration, "warmup_s": a.warmup, "connections": conns_list,
                "wrk_threads": a.wrk_threads, "chunks": a.chunks, "modes": modes, "targets": targets,
                "hapax_auth": a.auth, "access_log": logs, "state": a.state, "dedup": a.dedup, "workers": worker_counts,
                "pace_ms": a.pace_ms, "rounds": a.rounds,
                "pinning": {"gateway_and_proxy": gw_cpus, "upstream_and_wrk": load_cpus},
                "request_bytes": {m: len(wrk.request_body(m == "stream")) for m in MODES},
            },
            "results": [r.as_dict() for r in rows],
            "ratios": rs,
            "ratio_medians": summary,
            "profiles": {m: {k: v for k, v in p.items() if k != "text"} for m, p in profiles.items()},
        }, indent=2))
        print(f"\nwrote {out.relative_to(ROOT)}")
    return 0
