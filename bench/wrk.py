"""Driving wrk: the Lua script that shapes the request, and reading its report.

wrk is run with ``--latency``; its text report is parsed for requests/s and the
latency distribution, and a ``done`` hook in the script prints the exact
figures (µs, from wrk's HDR histogram) and error counts as one JSON line,
which wins where both are present.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL = "bench-model"
API_KEY = "sk-bench-not-a-secret"

_DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"p999_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def request_body(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one short sentence, please."},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
    }
    if stream:
        body["stream"] = True
        # Ask for usage so every target returns the same bytes (Hapax would hide the chunk otherwise).
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


def write_script(directory: Path, stream: bool, api_key: str = API_KEY, *, pace_ms: float = 0.0) -> Path:
    """Each request's body is made unique (a counter in ``user``), so a gateway that coalesces
    identical concurrent requests (Hapax's dedup) still makes one upstream call per request.

    ``pace_ms`` makes each connection wait that long on average (uniformly 0 to twice it)
    after a response before its next request (wrk's ``delay``), so the load stays below
    what the target can serve and latency is the request's own, not time queued behind
    others; the random wait keeps connections from moving in step (bursts queue too)."""
    body = request_body(stream).decode()
    assert "]]" not in body and body.startswith('{"model"')
    head, tail = '{"user":"bench-', '",' + body[1:]
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Accept"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {api_key}"\n'
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        f"  return wrk.format(nil, nil, nil, [[{head}]] .. n .. [[{tail}]])\n"
        "end\n" + (f"delay = function() return math.random() * {2 * pace_ms:g} end\n" if pace_ms > 0 else "")
        + _DONE_HOOK
    )
    path = directory / ("stream.lua" if stream else "nonstream.lua")
    path.write_text(script)
    return path


@dataclass
class WrkResult:
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    bytes: int = 0
    errors_connect: int = 0
    errors_read: int = 0
    errors_write: int = 0
    errors_timeout: int = 0
    non_2xx: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_PCT = re.compile(r"^\s+(50|75|90|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


def parse(output: str) -> WrkResult:
    r = WrkResult()
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if m:
        r.rps = float(m.group(1))
    pct = {p: float(v) * _UNIT[u] for p, v, u in _PCT.findall(output)}
    r.p50_ms, r.p90_ms, r.p99_ms = pct.get("50", 0.0), pct.get("90", 0.0), pct.get("99", 0.0)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if m:
        r.requests = int(m.group(1))
        r.duration_s = float(m.group(2)) * _UNIT[m.group(3)] / 1000
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if m:
        r.non_2xx = int(m.group(1))
    for line in output.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON ") :])
            r.requests = d["requests"]
            r.duration_s = d["duration_us"] / 1e6
            r.rps = r.requests / r.duration_s if r.duration_s else 0.0
            r.p50_ms, r.p90_ms, r.p99_ms = d["p50_us"] / 1e3, d["p90_us"] / 1e3, d["p99_us"] / 1e3
            r.p999_ms, r.max_ms, r.mean_ms = d["p999_us"] / 1e3, d["max_us"] / 1e3, d["mean_us"] / 1e3
            r.bytes = d["bytes"]
            r.errors_connect, r.errors_read = d["connect"], d["read"]
            r.errors_write, r.errors_timeout, r.non_2xx = d["write"], d["timeout"], d["status"]
    return r


def run(
    url: str,
    script: Path,
    *,
    duration: float,
    connections: int,
    threads: int,
    cpus: str | None,
    timeout_s: float = 10.0,
) -> tuple[WrkResult, str]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return parse(proc.stdout), proc.stdout
