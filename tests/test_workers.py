"""``hapax serve --workers N``: N real processes on one port, their supervisor, and /metrics
showing the node's totals whichever worker a scrape lands on."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.gateway_process import ROOT, GatewayProcess
from tests.reliability_support import wait_for

SLOW_REPLY = " ".join(f"w{i}" for i in range(15))
CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def _config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"reload_interval": 0.2, **server},
        "providers": {
            "demo": {"type": "mock"},
            "slow": {"type": "mock", "mock": {"chunk_delay_ms": 100, "reply": SLOW_REPLY}},
        },
        "models": [{"name": "demo", "provider": "demo"}, {"name": "slow", "provider": "slow"}],
    }


@pytest.fixture
def fresh_connections() -> Iterator[openai.OpenAI]:
    """An openai client that opens a new connection per request, so the kernel picks a
    worker for each (a kept-alive connection stays on the worker that accepted it)."""
    http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
    yield openai.OpenAI(base_url="http://unset/v1", api_key="x", max_retries=0, http_client=http)
    http.close()


def _client_for(base: openai.OpenAI, gw: GatewayProcess) -> openai.OpenAI:
    return base.with_options(base_url=gw.url + "/v1")


def _serve(config: dict[str, Any], tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp / "hapax.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(path), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HAPAX_REDIS_URL": ""},
        capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize("how", ["flag", "config"])
def test_more_than_one_worker_without_redis_is_refused(tmp_path: Path, how: str) -> None:
    cfg = _config(port=1) if how == "flag" else _config(port=1, workers=3)
    r = _serve(cfg, tmp_path, *(["--workers", "2"] if how == "flag" else []))
    n = 2 if how == "flag" else 3
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: --workers {n} needs shared state: without Redis")
    assert f"{n} workers would admit {n} times every limit" in lines[0]


def test_two_workers_both_answer_and_metrics_are_the_nodes_totals(
    gateway: Callable[..., GatewayProcess], redis_url: str, fresh_connections: openai.OpenAI,
) -> None:
    gw = gateway(_config(), workers=2, redis=redis_url)
    pids = gw.wait_workers(2)
    client = _client_for(fresh_connections, gw)
    answered: dict[str, int] = {}
    calls = 0
    while len(answered) < 2 or calls < 20:
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        calls += 1
        assert raw.parse().choices[0].message.content
        worker = raw.headers["x-hapax-worker"]
        answered[worker] = answered.get(worker, 0) + 1
        assert calls < 400, f"one worker answered every call: {answered}"
    assert sorted(answered) == ["0", "1"]

    # Whichever worker a scrape lands on, it reports both workers' counts added up.
    series = 'hapax_requests_total{model="demo",protocol="h1",provider="demo",route="chat_completions",status="200"}'
    scraped_by: set[str] = set()
    scrapes = 0
    while len(scraped_by) < 2:
        r = httpx.get(gw.url + "/metrics", headers={"connection": "close"}, timeout=5)
        scraped_by.add(r.headers["x-hapax-worker"])
        values = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and line[0] != "#")
        assert float(values[series]) == calls
        assert float(values["hapax_workers"]) == 2
        infos = re.findall(r'^hapax_worker_info\{pid="(\d+)",worker="(\d)"\} 1', r.text, re.MULTILINE)
        assert {int(w): int(p) for p, w in infos} == pids
        # Per-process series are per worker, not added up.
        assert {f'process_max_fds{{worker="{w}"}}' for w in "01"} <= set(values)
        scrapes += 1
        assert scrapes < 400, "one worker answered every scrape"


def test_workers_auto_is_one_per_core(gateway: Callable[..., GatewayProcess], redis_url: str) -> None:
    cores = len(os.sched_getaffinity(0))
    gw = gateway(_config(), workers="auto", redis=redis_url)
    pids = gw.wait_workers(cores)
    assert sorted(pids) == list(range(cores))
    text = httpx.get(gw.url + "/metrics").text
    assert f"hapax_workers {float(cores)}" in text


def test_metrics_follow_the_scrapers_accept_header(gateway: Callable[..., GatewayProcess], redis_url: str) -> None:
    gw = gateway(_config(), workers=2, redis=redis_url)
    r = httpx.get(gw.url + "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    assert "# TYPE hapax_requests counter" in r.text
    plain = httpx.get(gw.url + "/metrics")
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE hapax_requests_total counter" in plain.text


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(
    gateway: Callable[..., GatewayProcess], redis_url: str,
) -> None:
    gw = gateway(_config(), workers=2, redis=redis_url)
    pids = gw.wait_workers(2)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f'"pid":{victim},"how":"signal SIGKILL"' in gw.logs(), timeout=10, what="the death logged")
    # The survivor answers every new connection while the replacement starts.
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as http:
        for _ in range(20):
            r = http.get(gw.url + "/health/live")
            assert r.status_code == 200
            assert r.headers["x-hapax-worker"] == "1"
    new = gw.wait_workers(2, exclude=[victim])
    assert new[1] == pids[1] and new[0] != victim
    assert "worker died; restarting it" in gw.logs()


def test_sigterm_lets_streams_on_the_workers_finish_then_everything_exits(
    gateway: Callable[..., GatewayProcess], redis_url: str,
) -> None:
    gw = gateway(_config(shutdown_grace=10), workers=2, redis=redis_url)
    pids = gw.wait_workers(2)
    out: dict[str, Any] = {}
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)

    def run() -> None:
        text = ""
        try:
            with client:
                for c in client.chat.completions.create(model="slow", messages=CHAT["messages"], stream=True):
                    text += (c.choices[0].delta.content or "") if c.choices else ""
                    out["started"] = True
            out["text"] = text
        except Exception as exc:  # reported to the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: out.get("started"), timeout=10, what="the stream's first chunk")
    gw.signal(signal.SIGTERM)
    t.join(15)
    assert out.get("text") == SLOW_REPLY, out.get("error")
    assert gw.proc is not None
    assert gw.proc.wait(15) == 0
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} still running"
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/health/live")
    logs = gw.logs()
    assert logs.count('"abandoned_requests":0') == 2
    assert "supervisor stopped" in logs


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_workers_exit_when_the_supervisor_is_killed(gateway: Callable[..., GatewayProcess], redis_url: str) -> None:
    gw = gateway(_config(), workers=2, redis=redis_url)
    pids = gw.wait_workers(2)
    gw.signal(signal.SIGKILL)
    assert gw.proc is not None
    gw.proc.wait(5)
    for pid in pids.values():
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=15,
                 what=f"orphaned worker {pid} to exit")
    assert gw.logs().count("the supervisor is gone; draining this worker") == 2


def test_a_crash_looping_worker_backs_off_and_recovers(tmp_path: Path, redis_url: str) -> None:
    gw = GatewayProcess(_config(), tmp_path, workers=2, redis=redis_url)
    # Hold the port without SO_REUSEPORT: every worker fails to bind and exits.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", gw.port))
    try:
        gw.start(wait=False)
        wait_for(lambda: len(_restart_delays(gw.logs(), worker=0)) >= 3, timeout=20,
                 what="three restarts of worker 0")
        assert _restart_delays(gw.logs(), worker=0)[:3] == [0.25, 0.5, 1.0]  # doubling, not a spin
        blocker.close()
        gw.wait_workers(2, timeout=30)
    finally:
        blocker.close()
        gw.stop()


def _restart_delays(logs: str, *, worker: int) -> list[float]:
    return [float(d) for d in re.findall(
        rf'"msg":"worker died; restarting it","worker":{worker},.*?"restart_in_s":([\d.]+)', logs)]


def test_every_worker_applies_a_changed_config_file(gateway: Callable[..., GatewayProcess], redis_url: str) -> None:
    gw = gateway(_config(), workers=2, redis=redis_url)
    gw.wait_workers(2)
    new = _config()
    new["models"].append({"name": "fresh", "provider": "demo"})
    gw.write_config(new)
    updated: set[str] = set()

    def both_updated() -> bool:
        r = httpx.get(gw.url + "/v1/models", headers={"connection": "close"}, timeout=5)
        if "fresh" in [m["id"] for m in r.json()["data"]]:
            updated.add(r.headers["x-hapax-worker"])
        return updated == {"0", "1"}

    wait_for(both_updated, timeout=20, what="both workers to list the new model")
    # Log lines are written in batches: wait for both workers' lines, bounded.
    wait_for(lambda: gw.logs().count('"msg":"config reloaded"') == 2, timeout=5, what="both reload log lines")


async def test_four_workers_sharing_redis_admit_exactly_the_limit(
    gateway: Callable[..., GatewayProcess], redis_url: str,
) -> None:
    cfg = _config()
    cfg["limits"] = {"requests_per_minute": 10}
    gw = gateway(cfg, workers=4, redis=redis_url)
    gw.wait_workers(4)
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, http_client=http)

    async def call(i: int) -> tuple[int, str]:
        # Distinct prompts, so no two calls are deduplicated into one.
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": f"hi {i}"}])
            return 200, raw.headers["x-hapax-worker"]
        except openai.RateLimitError as exc:
            return exc.status_code, exc.response.headers["x-hapax-worker"]

    try:
        results = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(40))), 60)
    finally:
        await client.close()
        await http.aclose()
    codes = [code for code, _ in results]
    assert codes.count(200) == 10 and codes.count(429) == 30
    assert len({worker for _, worker in results}) > 1  # the calls were spread over the workers
