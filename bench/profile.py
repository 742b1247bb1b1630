"""Profile Hapax under the benchmark's load: py-spy (sampling, attached) or cProfile.

py-spy attaches to the running node (pinned beside wrk; it pauses the node briefly per sample) and
records collapsed stacks aggregated by function; they are summarised by self
time and by inclusive time, and by which code owns the frame. cProfile starts a
second node under ``bench.cprofile_node`` on its own port (deterministic, but
it slows Python code several-fold, so read its shares, not its times).
"""

from __future__ import annotations

import io
import os
import pstats
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from . import wrk
from .procs import Proc, free_port

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _owner(file: str) -> str:
    file = "/" + file.lstrip("/")
    for key, name in (
        ("/hapax/", "hapax"), ("/node/", "node"), ("aiohttp", "aiohttp"), ("multidict", "multidict"),
        ("yarl", "yarl"), ("uvloop", "uvloop"), ("asyncio", "asyncio"), ("logging", "logging"),
        ("orjson", "orjson"),
    ):
        if key in file:
            return name
    return "other"


def summarise_collapsed(path: Path, top: int = 25) -> tuple[str, dict[str, Any]]:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        # Only the event loop's thread: helper threads parked in C (pycares' channel reaper,
        # the default executor) are not always recognised as idle by py-spy.
        if not frames or "threading.py" in frames[0]:
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        m = _FRAME.match(frames[-1])
        owners[_owner(m.group("file")) if m else "other"] += count
    out = io.StringIO()
    out.write(f"{total} samples (busy only)\n\nself time by owner:\n")
    for k, v in owners.most_common():
        out.write(f"  {100 * v / total:5.1f}%  {k}\n")
    out.write(f"\ntop {top} by self time:\n")
    for k, v in self_c.most_common(top):
        out.write(f"  {100 * v / total:5.1f}%  {k}\n")
    out.write(f"\ntop {top} by inclusive time (hapax/node frames):\n")
    own = [(k, v) for k, v in incl.most_common() if (m := _FRAME.match(k)) and _owner(m["file"]) in ("hapax", "node")]
    for k, v in own[:top]:
        out.write(f"  {100 * v / total:5.1f}%  {k}\n")
    data = {
        "samples": total,
        "self_by_owner": {k: v / total for k, v in owners.most_common()},
        "top_self": [(k, v / total) for k, v in self_c.most_common(top)],
        "top_inclusive_own": [(k, v / total) for k, v in own[:top]],
    }
    return out.getvalue(), data


def profile_hapax(
    kind: str,
    hapax: Proc,
    url: str,
    script: Path,
    tmp: Path,
    mode: str,
    *,
    duration: float,
    connections: int,
    load_cpus: str | None,
    python: str,
    cfg_path: Path,
    gw_cpus: str | None,
    env: dict[str, str],
) -> dict[str, Any]:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if kind == "py-spy":
        spy = shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("py-spy is not on PATH: pip install py-spy (or use --profile cprofile)")
        raw = RESULTS / f"{stamp}-pyspy-{mode}.txt"
        cmd = [spy, "record", "--pid", str(hapax.pid), "--duration", str(round(duration)), "--rate", "250",
               "--format", "raw", "--function", "-o", str(raw)]
        if load_cpus is not None:
            cmd = ["taskset", "-c", load_cpus, *cmd]
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        res, _ = wrk.run(url, script, duration=duration + 1, connections=connections, threads=1, cpus=load_cpus)
        spy_out, _ = spy_proc.communicate(timeout=duration + 30)
        if spy_proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {spy_out.decode(errors='replace')[-1000:]}")
        text, data = summarise_collapsed(raw)
        summary = raw.with_suffix(".summary.txt")
        summary.write_text(text)
        return {"tool": "py-spy", "raw_path": str(raw), "summary_path": str(summary), "rps_while_profiled": res.rps,
                "text": text, **data}

    # cProfile: a second node on its own port, same config otherwise.
    port = free_port()
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["server"]["port"] = port
    pcfg = tmp / f"hapax-cprofile-{mode}.yaml"
    pcfg.write_text(yaml.safe_dump(cfg))
    stats_path = RESULTS / f"{stamp}-cprofile-{mode}.pstats"
    node = Proc(f"hapax-cprofile-{mode}", [python, "-m", "bench.cprofile_node", "serve", "--config", str(pcfg)],
                tmp, cpus=gw_cpus, env={**env, "HAPAX_BENCH_CPROFILE": str(stats_path)})
    try:
        node.wait_http(f"http://127.0.0.1:{port}/health/ready")
        purl = url.replace(url.split("/")[2], f"127.0.0.1:{port}")
        res, _ = wrk.run(purl, script, duration=duration, connections=connections, threads=1, cpus=load_cpus)
    finally:
        node.stop()
    for _ in range(50):
        if stats_path.exists():
            break
        time.sleep(0.1)
    out = io.StringIO()
    st = pstats.Stats(str(stats_path), stream=out)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(r"hapax|node", 25)
    text = re.sub(rf"{re.escape(os.getcwd())}/?", "", out.getvalue())
    summary = stats_path.with_suffix(".summary.txt")
    summary.write_text(text)
    return {"tool": "cprofile", "stats_path": str(stats_path), "summary_path": str(summary),
            "rps_while_profiled": res.rps, "text": text}
