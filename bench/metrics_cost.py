"""``python -m bench metrics``: what one counted event costs on the request path, Hapax's
counters against ``prometheus_client``'s, in its default and its multiprocess mode.

Why it exists: /metrics must show the node's totals across worker processes. The
library's multiprocess mode does that by writing every value to a memory-mapped
file per process; Hapax instead keeps its plain in-process counters and merges the
workers' values at scrape time. This measures the per-event price of each choice
(CPU time per call of a labelled counter increment and a histogram observation, the
two things a request does several times), in fresh interpreters so the modes do not
share state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from .procs import ROOT

_HAPAX = r"""
import time
from hapax._metrics import Counter, Histogram, LATENCY_BUCKETS
c = Counter("c_total", "c", ("route", "model", "provider", "status"))
h = Histogram("h_seconds", "h", ("route", "model", "status_class"), buckets=LATENCY_BUCKETS)
N = {n}
t0 = time.process_time()
for _ in range(N):
    c.inc("chat_completions", "m", "p", "200")
t1 = time.process_time()
for _ in range(N):
    h.observe(0.0123, "chat_completions", "m", "2xx")
t2 = time.process_time()
print((t1 - t0) / N * 1e9, (t2 - t1) / N * 1e9)
"""

_LIBRARY = r"""
import time
from prometheus_client import Counter, Histogram
from hapax._metrics import LATENCY_BUCKETS
c = Counter("c_total", "c", ("route", "model", "provider", "status"))
h = Histogram("h_seconds", "h", ("route", "model", "status_class"), buckets=LATENCY_BUCKETS)
N = {n}
t0 = time.process_time()
for _ in range(N):
    c.labels("chat_completions", "m", "p", "200").inc()
t1 = time.process_time()
for _ in range(N):
    h.labels("chat_completions", "m", "2xx").observe(0.0123)
t2 = time.process_time()
print((t1 - t0) / N * 1e9, (t2 - t1) / N * 1e9)
"""


def _run(code: str, env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    return float(out[0]), float(out[1])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300_000, help="calls per measurement (300000)")
    p.add_argument("--repeat", type=int, default=3, help="fresh interpreters per variant; the best is kept (3)")
    a = p.parse_args(argv)
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    variants: dict[str, tuple[str, dict[str, str]]] = {
        "hapax counters": (_HAPAX, base),
        "prometheus_client": (_LIBRARY, base),
    }
    with tempfile.TemporaryDirectory(prefix="hapax-bench-mp-") as mp:
        variants["prometheus_client multiprocess"] = (_LIBRARY, {**base, "PROMETHEUS_MULTIPROC_DIR": mp})
        results = {}
        for name, (code, env) in variants.items():
            runs = [_run(code.replace("{n}", str(a.calls)), env) for _ in range(a.repeat)]
            results[name] = {"counter_inc_ns": min(r[0] for r in runs), "histogram_observe_ns": min(r[1] for r in runs)}
    print(f"{'variant':<32} {'counter inc ns':>14} {'histogram observe ns':>20}")
    for name, r in results.items():
        print(f"{name:<32} {r['counter_inc_ns']:>14.0f} {r['histogram_observe_ns']:>20.0f}")
    print(json.dumps(results))
    return 0
