"""Key, usage and audit writes never stall the node, through a running ``hapax serve``.

The node writes its state directory from background threads. These tests make
that directory stuck (its advisory locks held by the test, as a hung CLI or a
dead NFS server would), flood the node with bad keys, and stop it with SIGTERM,
and look at what the node answers and what reaches the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

from hapax.access import verify
from tests.gateway_process import GatewayProcess

ADMIN_KEY = "hpx_admin_" + "W" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _config(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}", "state_dir": "state"},
        "providers": {"mock": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": "demo", "provider": "mock"}],
        "pricing": {"demo": {"input": 1000.0, "output": 2000.0}},
    }
    cfg.update(extra)
    return cfg


def _wait(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen in time: {what}")
        time.sleep(0.05)


def _state(gw: GatewayProcess) -> Path:
    return gw.config_path.parent / "state"


def _events(gw: GatewayProcess) -> list[dict[str, Any]]:
    d = _state(gw) / "audit"
    return [orjson.loads(line) for f in sorted(d.glob("audit*.jsonl")) for line in f.read_bytes().splitlines()]


def _metric(gw: GatewayProcess, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(gw.url + "/metrics", timeout=10).text, re.M)
    assert m is not None, name
    return float(m.group(1))


def _create_key(gw: GatewayProcess, name: str) -> tuple[str, str]:
    r = httpx.post(gw.url + "/admin/keys", headers=ADMIN, json={"name": name}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


@contextmanager
def _held(*locks: Path) -> Iterator[None]:
    """Hold the node's advisory locks: its writer threads block in ``flock`` until released."""
    fds = []
    try:
        for p in locks:
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def test_a_stuck_state_dir_does_not_stall_the_node(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = _config(audit={"queue_size": 20}, usage={"flush_interval": 0.2})
    gw = gateway(cfg, env=ENV)
    _wait(lambda: any(e["event"] == "gateway.started" for e in _events(gw)), "the start-up event on disk")
    state = _state(gw)
    keys_file = state / "keys" / "keys.json"
    with _held(state / "audit" / ".audit.lock", state / "keys" / ".keys.lock"):
        # A key made while the disk is stuck works at once: it is in memory before it is on disk.
        secret, key_id = _create_key(gw, "made-while-stuck")
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, timeout=10, max_retries=0)
        for _ in range(3):
            reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "ok"
        # Far more audit events than the queue holds: each admin call is one.
        for _ in range(40):
            assert httpx.get(gw.url + "/admin/whoami", headers=ADMIN, timeout=10).status_code == 200
        assert httpx.get(gw.url + "/health/live", timeout=10).status_code == 200
        dropped = _metric(gw, "hapax_audit_events_dropped_total")
        assert dropped > 0
        # The writers really are stuck: nothing of this has reached the disk.
        assert not keys_file.exists() or key_id not in keys_file.read_text()
        assert not any(e["event"] == "key.created" for e in _events(gw))
    # Released: the key and the events queued before the queue filled land, with the loss said.
    _wait(lambda: keys_file.exists() and key_id in keys_file.read_text(), "the key on disk")

    def settled() -> bool:
        kinds = [e["event"] for e in _events(gw)]
        return "key.created" in kinds and "audit.dropped" in kinds

    _wait(settled, "key.created and audit.dropped in the audit")
    events = _events(gw)
    assert sum(e["details"]["dropped"] for e in events if e["event"] == "audit.dropped") == dropped
    assert verify(state / "audit").ok
    _wait(lambda: key_id in (state / "usage.json").read_text() if (state / "usage.json").exists() else False,
          "the usage row on disk")


def test_an_audit_file_nobody_reads_stalls_neither_requests_nor_the_exit(
    gateway: Callable[..., GatewayProcess],
) -> None:
    """The live audit file swapped for a FIFO with no reader: the writer blocks in open() for
    good. Requests are still answered, and SIGTERM still ends the node (it gives the stuck
    writer its bounded wait, says so in the log, and exits 0)."""
    gw = gateway(_config(), env=ENV)
    _wait(lambda: any(e["event"] == "gateway.started" for e in _events(gw)), "the start-up event on disk")
    live = _state(gw) / "audit" / "audit.jsonl"
    live.unlink()
    os.mkfifo(live, 0o600)
    secret, _ = _create_key(gw, "made-with-a-fifo")  # audited: the writer now blocks on the FIFO
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, timeout=10, max_retries=0)
    for _ in range(5):
        assert httpx.get(gw.url + "/admin/whoami", headers=ADMIN, timeout=10).status_code == 200
        assert httpx.get(gw.url + "/health/live", timeout=10).status_code == 200
        reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "ok"
    assert gw.stop() == 0
    assert "audit: not everything was written before shutdown" in gw.logs()
    # The other stores were not held back by the stuck audit writer.
    assert "made-with-a-fifo" in (_state(gw) / "keys" / "keys.json").read_text()


def test_a_flood_of_bad_keys_is_coalesced_and_real_events_still_recorded(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(_config(), env=ENV)
    n = 400
    start = time.time()

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=gw.url, timeout=15, limits=limits) as c:
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> int:
                async with sem:
                    r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer hpx_bad{i:040d}"},
                                     json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    statuses = asyncio.run(asyncio.wait_for(flood(), 120))
    end = time.time()
    assert statuses == [401] * n
    _, key_id = _create_key(gw, "after-the-flood")

    def failed() -> list[dict[str, Any]]:
        return [e for e in _events(gw) if e["event"] == "auth.failed"]

    _wait(lambda: sum(e["details"]["count"] for e in failed()) == n, "every failure counted in the audit")
    _wait(lambda: any(e["event"] == "key.created" and e["target"] == key_id for e in _events(gw)), "key.created")
    records = failed()
    # One record per (second, reason, remote, actor): all came from one address with one reason.
    assert len(records) <= int(end) - int(start) + 1, len(records)
    assert {(e["remote"], e["actor"], e["details"]["reason"]) for e in records} == {("127.0.0.1", "unknown", "unknown")}
    assert all(e["request_id"].startswith("req_") for e in records)
    assert _metric(gw, 'hapax_auth_failures_total{reason="unknown"}') == n
    assert verify(_state(gw) / "audit").ok


def test_sigterm_flushes_keys_usage_and_audit(gateway: Callable[..., GatewayProcess]) -> None:
    # Usage is written every hour here: only the shutdown flush can put it on disk.
    gw = gateway(_config(usage={"flush_interval": 3600}), env=ENV)
    secret, key_id = _create_key(gw, "flushed")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, timeout=10, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(gw.url + "/admin/whoami", headers={"authorization": f"Bearer {secret}"},
                     timeout=10).status_code == 200
    assert gw.stop() == 0  # SIGTERM
    state = _state(gw)
    keys = orjson.loads((state / "keys" / "keys.json").read_bytes())["keys"]
    rec = next(k for k in keys if k["id"] == key_id)
    assert rec["last_used_at"] is not None
    rows = [r for r in orjson.loads((state / "usage.json").read_bytes())["rows"] if r["key"] == key_id]
    assert sum(r["requests"] for r in rows) == 3 and sum(r["cost_usd"] for r in rows) > 0
    events = _events(gw)
    assert any(e["event"] == "key.created" and e["target"] == key_id for e in events)
    assert any(e["event"] == "admin.request" and e["actor"] == key_id for e in events)
    assert verify(state / "audit").ok
