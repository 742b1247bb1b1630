"""``python -m bench h3``: the HTTP/3 door beside the HTTP/1.1 door of one node, in one run.

One Hapax node with ``server.http3`` on (a ``hapax certs dev`` pair) in front of
bench.upstream. For each mode (non-streaming, streaming) it measures, one after
the other with the same concurrency:

- ``h1-wrk``: HTTP/1.1 under wrk (the reference of ``python -m bench``);
- ``h1-py``: HTTP/1.1 under bench.h3load's aiohttp client;
- ``h3-py``: HTTP/3 under bench.h3load's aioquic client.

``h1-py`` and ``h3-py`` share the load generator's language and shape, so their
ratio is the door's; CPU per request of the node is the figure that does not
depend on how fast the client is. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import wrk
from .procs import ROOT, Proc, free_port, system_busy_seconds
from .run import _hapax_config, _sanity

MODES = ("nonstream", "stream")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench h3", description=__doc__)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per row (5)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=10, help="concurrent connections, one request each (10)")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per upstream stream (20)")
    p.add_argument("--only", choices=MODES)
    return p.parse_args(argv)


def _row(name: str, mode: str, res: dict[str, Any], node_cpu: float, foreign: float) -> dict[str, Any]:
    n = res["requests"]
    return {"door": name, "mode": mode, **res,
            "node_cpu_us_per_request": node_cpu * 1e6 / n if n else None,
            "foreign_cpu_pct_of_one_core": 100 * foreign / res["duration_s"] if res["duration_s"] else None}


def render(rows: list[dict[str, Any]]) -> str:
    head = f"{'mode':<10} {'door':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'node CPU us/req':>15} " \
           f"{'errors':>6} {'foreign %':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cpu = r["node_cpu_us_per_request"]
        foreign = r["foreign_cpu_pct_of_one_core"]
        lines.append(
            f"{r['mode']:<10} {r['door']:<7} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{'-' if cpu is None else format(cpu, '>15.0f')} {r['errors']:>6} "
            f"{'-' if foreign is None else format(foreign, '>9.0f')}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for mode in MODES:
        by = {r["door"]: r for r in rows if r["mode"] == mode}
        h1, h3 = by.get("h1-py"), by.get("h3-py")
        if h1 is None or h3 is None or not h1["rps"]:
            continue
        parts = [f"{mode:<10} req/s h3/h1 {h3['rps'] / h1['rps']:.2f}"]
        if h1["node_cpu_us_per_request"] and h3["node_cpu_us_per_request"]:
            parts.append(f"node CPU/req h3/h1 {h3['node_cpu_us_per_request'] / h1['node_cpu_us_per_request']:.2f}")
        parts.append(f"p50 h3 {h3['p50_ms'] - h1['p50_ms']:+.2f} ms, "
                     f"p99 h3 {h3['p99_ms'] - h1['p99_ms']:+.2f} ms vs h1")
        out.append("  ".join(parts))
    return out


def main(argv: list[str]) -> int:
    a = _args(argv)
    from node.certs import write_dev_pair

    tmp = Path(tempfile.mkdtemp(prefix="hapax-bench-h3-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    cert, key = write_dev_pair(tmp / "certs")
    up_port, port = free_port(), free_port()
    cfg = _hapax_config(port, up_port, max(100, a.connections))
    cfg["server"]["http3"] = {"enabled": True, "certificate_file": str(cert), "key_file": str(key)}
    cfg_path = tmp / "hapax.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    scripts = {m: wrk.write_script(tmp, m == "stream") for m in MODES}
    modes = [a.only] if a.only else list(MODES)
    rows: list[dict[str, Any]] = []
    procs: dict[str, Proc] = {}
    try:
        procs["upstream"] = Proc("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(up_port),
                                              "--chunks", str(a.chunks)], tmp, cpus=None, env=env)
        procs["upstream"].wait_port(up_port)
        node = procs["hapax"] = Proc("hapax", [sys.executable, "-m", "node", "serve", "--config", str(cfg_path)],
                                     tmp, cpus=None, env=env)
        node.wait_http(f"http://127.0.0.1:{port}/health/ready")
        _sanity("hapax", url, a.chunks)
        for mode in modes:
            for door in ("h1-wrk", "h1-py", "h3-py"):
                t0, busy0 = node.cpu(), system_busy_seconds()
                ours0 = sum(p.cpu() for p in procs.values())
                wall0 = time.monotonic()
                if door == "h1-wrk":
                    if a.warmup > 0:
                        wrk.run(url, scripts[mode], duration=a.warmup, connections=a.connections, threads=1, cpus=None)
                        t0, busy0, ours0 = node.cpu(), system_busy_seconds(), sum(p.cpu() for p in procs.values())
                    w, _ = wrk.run(url, scripts[mode], duration=a.duration, connections=a.connections,
                                   threads=1, cpus=None)
                    res = {"requests": w.requests, "errors": w.errors_connect + w.errors_read + w.errors_write
                           + w.errors_timeout + w.non_2xx, "duration_s": w.duration_s, "rps": w.rps,
                           "p50_ms": w.p50_ms, "p99_ms": w.p99_ms}
                    client_cpu = 0.0  # wrk's own CPU is not subtracted from "foreign" below
                else:
                    cmd = [sys.executable, "-m", "bench.h3load", "--protocol", door[:2], "--port", str(port),
                           "--cafile", str(cert), "--connections", str(a.connections),
                           "--duration", str(a.duration), "--warmup", str(a.warmup)]
                    if mode == "stream":
                        cmd.append("--stream")
                    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                                         timeout=a.warmup + a.duration + 60).stdout
                    res = json.loads(out.strip().splitlines()[-1])
                    client_cpu = res.pop("client_cpu_s")
                    # The warm-up's CPU is in the node's figure too: scale it to the measured share.
                    elapsed = time.monotonic() - wall0
                    share = res["duration_s"] / elapsed if elapsed > 0 else 1.0
                node_cpu = node.cpu() - t0
                foreign = max(0.0, system_busy_seconds() - busy0 - (sum(p.cpu() for p in procs.values()) - ours0)
                              - client_cpu)
                if door != "h1-wrk":
                    node_cpu *= share
                    foreign *= share
                rows.append(_row(door, mode, res, node_cpu, foreign))
                print(render(rows[-1:]).splitlines()[-1], flush=True)
                for p in procs.values():
                    p.check()
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
    print()
    print(f"one node, HTTP/1.1 and HTTP/3 doors; {a.connections} connections, {a.duration:g}s per row after "
          f"{a.warmup:g}s warm-up; stream = {a.chunks} chunks + usage + [DONE]; nothing pinned")
    print(render(rows))
    noisy = [r for r in rows if (r["foreign_cpu_pct_of_one_core"] or 0) > 10]
    if noisy:
        print(f"WARNING: {len(noisy)} row(s) shared the machine with other work (foreign % > 10)")
    print()
    print("\n".join(ratios(rows)))
    return 0
