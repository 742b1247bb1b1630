"""What an operator reads: /metrics (known series at 0, latency by model and status class,
process metrics) and the access log (fields and format, buffered off the loop, flushed at exit,
never stalling requests on a slow stderr)."""

from __future__ import annotations

import json
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

import hapax
from tests.gateway_process import ROOT, GatewayProcess
from tests.upstreams.server import free_port

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}


def _config(**logging: object) -> dict[str, object]:
    return {
        "logging": dict(logging),
        "providers": {
            "demo": {"type": "mock"},
            "down": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": 503}},
        },
        "models": [
            {"name": "demo", "provider": "demo", "model": "demo-up"},
            {"name": "down", "provider": "down"},
        ],
        "teams": {"blue": {}},
    }


def _metrics(gw: GatewayProcess) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_counters_exist_at_zero_before_any_request(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    m = _metrics(gw)
    for series in (
        'hapax_requests_total{model="demo",protocol="h1",provider="demo",route="chat_completions",status="200"}',
        'hapax_requests_total{model="down",protocol="h1",provider="down",route="messages",status="502"}',
        'hapax_errors_total{code="upstream_unavailable",model="demo",route="chat_completions",type="api_error"}',
        'hapax_errors_total{code="rate_limit_exceeded",model="down",route="embeddings",type="rate_limit_error"}',
        'hapax_tokens_total{direction="output",model="demo",provider="demo"}',
        'hapax_upstream_attempts_total{deployment="demo/demo-up",outcome="ok"}',
        'hapax_upstream_attempts_total{deployment="down/down",outcome="upstream_timeout"}',
        'hapax_circuit_transitions_total{deployment="down/down",to="open"}',
        'hapax_retries_total{model="demo"}',
        'hapax_failovers_total{model="down"}',
        'hapax_config_reloads_total{result="failure"}',
        'hapax_auth_failures_total{reason="unknown"}',
        'hapax_limited_total{limit="daily_usd",scope="team"}',
        'hapax_queue_rejections_total{reason="queue_timeout"}',
        'hapax_team_requests_total{model="demo",team="blue"}',
        'hapax_cost_usd_total{model="down",team="blue"}',
        "hapax_log_lines_dropped_total",
    ):
        assert m.get(series) == 0, series
    assert m[f'hapax_build_info{{python="{platform.python_version()}",version="{hapax.__version__}"}}'] == 1
    assert m["process_cpu_seconds_total"] > 0
    assert m["process_resident_memory_bytes"] > 10_000_000
    assert m["process_open_fds"] >= 3
    assert m["process_max_fds"] >= m["process_open_fds"]
    assert 0 < time.time() - m["process_start_time_seconds"] < 600
    assert 'python_gc_collections_total{generation="2"}' in m
    assert 'python_gc_pause_seconds_count{generation="0"}' in m
    # What start-up built is frozen: full collections under load no longer walk it.
    assert m["python_gc_frozen_objects"] > 10_000


def test_latency_by_model_status_class_and_deployment(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="down", messages=CHAT["messages"])  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])  # type: ignore[arg-type]
    client.close()
    m = _metrics(gw)
    dur = "hapax_request_duration_seconds_count"
    assert m[f'{dur}{{model="demo",protocol="h1",route="chat_completions",status_class="2xx"}}'] == 2
    assert m[f'{dur}{{model="down",protocol="h1",route="chat_completions",status_class="5xx"}}'] == 1
    assert m[f'{dur}{{model="none",protocol="h1",route="chat_completions",status_class="4xx"}}'] == 1
    assert m['hapax_upstream_duration_seconds_count{deployment="demo/demo-up",provider="demo"}'] == 2
    assert m['hapax_upstream_duration_seconds_count{deployment="down/down",provider="down"}'] == 1
    errors = 'hapax_errors_total{code="upstream_unavailable",model="down",route="chat_completions",type="api_error"}'
    assert m[errors] == 1
    errors = 'hapax_errors_total{code="model_not_found",model="none",route="chat_completions",'
    assert m[errors + 'type="invalid_request_error"}'] == 1
    assert not any('model="nope"' in k for k in m)  # client input never becomes a label


def _access_lines(gw: GatewayProcess, n: int) -> list[str]:
    """The access lines in the log once there are ``n`` (bounded wait: they are written in batches)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [ln for ln in gw.logs().splitlines() if "hapax.access" in ln and "request" in ln
                 and "/v1/" in ln]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_access_line_json_keys_and_values(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
    rid = r.headers["x-request-id"]
    (line,) = [ln for ln in _access_lines(gw, 1) if rid in ln]
    entry = json.loads(line)
    assert list(entry)[:4] == ["ts", "level", "logger", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert entry["level"] == "info" and entry["logger"] == "hapax.access" and entry["msg"] == "request"
    assert entry["request_id"] == rid and entry["status"] == 200 and entry["route"] == "chat_completions"
    assert entry["model"] == "demo" and entry["provider"] == "demo"
    assert entry["prompt_tokens"] > 0 and entry["latency_ms"] > 0


def test_access_line_text_format(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config(format="text"))
    rid = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10).headers["x-request-id"]
    (line,) = [ln for ln in _access_lines(gw, 1) if rid in ln]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO hapax.access: request ", line), line
    assert f"request_id={rid} " in line and " status=200 " in line and " model=demo " in line


def test_access_log_off_writes_no_access_lines(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config(access_log=False))
    for _ in range(5):
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    assert gw.stop() == 0
    logs = gw.logs()
    assert '"stopped"' in logs  # the log is complete: the node stopped and flushed it
    assert '"msg":"request"' not in logs


def test_buffered_access_lines_are_written_at_shutdown(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        ids = {c.post("/v1/chat/completions", json=CHAT).headers["x-request-id"] for _ in range(50)}
    gw.signal(signal.SIGTERM)  # straight away: some lines are still in the buffer
    assert gw.stop() == 0
    logged = {json.loads(ln)["request_id"] for ln in gw.logs().splitlines() if '"msg":"request"' in ln
              and "/v1/" in ln}
    assert ids <= logged


@pytest.fixture
def node_on_unread_pipe(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A node whose stderr is a pipe nobody reads yet: a log shipper that fell behind."""
    port = free_port()
    cfg = _config()
    cfg["server"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "hapax.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(path)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "node did not come up"
            try:
                if httpx.get(url + "/health/live", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_a_stderr_pipe_nobody_reads_does_not_stall_requests(
    node_on_unread_pipe: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = node_on_unread_pipe
    n = 1500  # ~400 bytes of access line each: several times what a pipe holds (64 KiB)
    with httpx.Client(base_url=url, timeout=5) as c:
        for _ in range(n):
            # Writing each line from the event loop would block it once the pipe is full,
            # and this request would time out.
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.get("/health/live").status_code == 200
    # The lines were kept, not lost: read the pipe and see every one of them.
    assert proc.stderr is not None
    seen: list[int] = [0]
    done = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b'"msg":"request"' in line and b"/v1/chat" in line:
                seen[0] += 1
                if seen[0] >= n:
                    done.set()
                    return

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(30), f"{seen[0]} of {n} access lines"


def test_a_reload_adds_the_new_models_series_at_zero(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = _config()
    gw = gateway(cfg)
    models = [*cfg["models"], {"name": "extra", "provider": "demo", "model": "extra-up"}]  # type: ignore[misc]
    gw.write_config({**cfg, "models": models})
    gw.signal(signal.SIGHUP)
    want = ('hapax_requests_total{model="extra",protocol="h1",provider="demo",route="chat_completions",status="502"}',
            'hapax_upstream_attempts_total{deployment="demo/extra-up",outcome="ok"}')
    deadline = time.monotonic() + 10
    while not all(k in (m := _metrics(gw)) for k in want) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [m.get(k) for k in want] == [0, 0]
