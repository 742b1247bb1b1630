"""``python -m bench accesslog``: what writing one access line costs, in this process.

Times the node's access sink (``node.logs.ACCESS``: orjson into the buffered writer
thread) and, for comparison, one ``logging`` record per line through the JSON
formatter and a ``StreamHandler`` (how access lines were written before), both
writing to the same file, with the same fields a chat completion's line has.
The writer thread's work (join and write) is in the figure: it runs in this
process and is timed by CPU, not wall clock.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

from hapax import LoggingAccessSink
from hapax.config import LoggingConfig
from node import logs

FIELDS = {
    "request_id": "req_4dc2c5bd2cde000000000003", "method": "POST", "path": "/v1/chat/completions",
    "route": "chat_completions", "status": 200, "latency_ms": 1.257, "remote": "127.0.0.1",
    "model": "bench-model", "provider": "bench", "upstream_ms": 0.297, "prompt_tokens": 24,
    "completion_tokens": 20, "cost_usd": 0.0,
}


def _cpu() -> float:
    return time.process_time()  # all threads of this process


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench accesslog", description=__doc__)
    p.add_argument("--lines", type=int, default=200_000)
    a = p.parse_args(argv)
    with tempfile.NamedTemporaryFile(prefix="hapax-accesslog-", suffix=".log") as out:
        new, old = _measure(out.fileno(), a.lines)
    print(f"access line, node sink (orjson + buffered writer): {new * 1e6:6.1f} us CPU")
    print(f"access line, logging record + JSONFormatter + StreamHandler: {old * 1e6:6.1f} us CPU")
    print(f"({a.lines} lines to a file)")
    return 0


def _measure(fd: int, lines: int) -> tuple[float, float]:
    """CPU seconds per line of each path, less the cost of building the fields."""
    saved = os.dup(2)
    os.dup2(fd, 2)  # both paths write to stderr; make it a file
    try:
        logs.configure(LoggingConfig())
        sink = logs.ACCESS
        t0 = _cpu()
        for _ in range(lines):
            sink(dict(FIELDS))  # the gateway builds a fresh dict per request
        logs.flush()
        new = (_cpu() - t0) / lines
        root = logging.getLogger()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logs.JSONFormatter())
        root.handlers[:] = [handler]
        old_sink = LoggingAccessSink()
        n = lines // 4
        t0 = _cpu()
        for _ in range(n):
            old_sink(dict(FIELDS))
        old = (_cpu() - t0) / n
        t0 = _cpu()
        for _ in range(lines):
            dict(FIELDS)
        base = (_cpu() - t0) / lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return new - base, old - base
