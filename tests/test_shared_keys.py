"""Keys and usage shared through Redis, shown through two real nodes.

Every test starts two ``python -m node serve`` processes on different ports,
given the same Redis (the session's real redis-server, emptied per test) and
cluster name, and talks to them with the openai SDK, httpx and the ``hapax``
CLI: a key made or revoked through one node's admin API is seen by the other,
and usage from calls on both is summed on either.
"""

from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis

from hapax.access._keys_redis import NEGATIVE_TTL, RESYNC_INTERVAL
from tests.gateway_process import ROOT, GatewayProcess
from tests.redis_server import RedisServer

ADMIN_KEY = "hpx_admin_" + "R" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
MSG = [{"role": "user", "content": "hi"}]
Start = Callable[..., GatewayProcess]


def config(redis_url: str, *, cluster: str = "c1", **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}", "state_dir": "state"},
        "state": {"cluster": cluster, "redis": {"url": redis_url}},
        "providers": {"mock": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": "demo", "provider": "mock"}],
        "pricing": {"demo": {"input": 1000.0, "output": 2000.0}},
    }
    cfg.update(extra)
    return cfg


def pair(gateway: Start, redis_url: str, **kw: Any) -> tuple[GatewayProcess, GatewayProcess]:
    return gateway(config(redis_url, **kw), env=ENV), gateway(config(redis_url, **kw), env=ENV)


def admin(gw: GatewayProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10, **kw)


def make_key(gw: GatewayProcess, **spec: Any) -> tuple[str, str]:
    spec.setdefault("name", "k")
    r = admin(gw, "POST", "/admin/keys", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


def client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    # No SDK retries: a refusal must be seen as the node gave it.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


def call(gw: GatewayProcess, key: str) -> str:
    out = client(gw, key).chat.completions.create(model="demo", messages=MSG)  # type: ignore[arg-type]
    return out.choices[0].message.content or ""


def refused(gw: GatewayProcess, key: str) -> openai.AuthenticationError | None:
    try:
        call(gw, key)
    except openai.AuthenticationError as exc:
        return exc
    return None


def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        out = check()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def hapax_cli(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **ENV}, timeout=60)


def test_a_key_made_on_one_node_works_on_the_other_at_once(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url)
    secret, key_id = make_key(a, name="alice", team="red")
    # No wait: B has not necessarily heard of it, and asks Redis before answering 401.
    assert call(b, secret) == "ok"
    listed = admin(b, "GET", "/admin/keys").json()["data"]
    assert [k["id"] for k in listed] == [key_id]
    me = client(b, secret).get("/me", cast_to=httpx.Response).json()
    assert (me["id"], me["name"], me["team"]) == (key_id, "alice", "red")
    # An update on B (a new model allowlist) holds on A.
    r = admin(b, "PATCH", f"/admin/keys/{key_id}", json={"models": []})
    assert r.status_code == 200, r.text

    def denied_on_a() -> bool:
        try:
            call(a, secret)
        except openai.PermissionDeniedError:
            return True
        return False

    until(denied_on_a, "A applies B's update")
    # With Redis, state_dir keeps the audit log only: the keys are not in a file.
    state = a.config_path.parent / "state"
    assert not (state / "keys" / "keys.json").exists()
    assert b"key.created" in b"".join(f.read_bytes() for f in (state / "audit").glob("*.jsonl"))


def test_a_revoked_key_is_refused_on_the_other_node(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url)
    secret, key_id = make_key(a)
    assert call(b, secret) == "ok"  # B holds it in its local copy now
    assert admin(a, "POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    exc = until(lambda: refused(b, secret), "B refuses the key A revoked")
    assert exc.status_code == 401
    assert "revoked" in exc.message
    assert refused(a, secret) is not None


def test_a_rotated_key_old_secret_stops_and_new_one_works_everywhere(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url)
    old, key_id = make_key(a)
    assert call(b, old) == "ok"
    r = admin(b, "POST", f"/admin/keys/{key_id}/rotate")
    assert r.status_code == 200, r.text
    new = r.json()["key"]
    assert call(a, new) == "ok"  # at once: A asks Redis about the secret it does not know
    until(lambda: refused(a, old), "A refuses the old secret")
    assert refused(b, old) is not None


def test_another_cluster_name_on_the_same_redis_sees_none_of_the_keys(gateway: Start, redis_url: str) -> None:
    a = gateway(config(redis_url, cluster="c1"), env=ENV)
    other = gateway(config(redis_url, cluster="c2"), env=ENV)
    secret, _ = make_key(a)
    exc = refused(other, secret)
    assert exc is not None and "invalid API key" in exc.message
    assert admin(other, "GET", "/admin/keys").json()["data"] == []
    mine, _ = make_key(other, name="theirs")
    assert refused(a, mine) is not None
    assert [k["name"] for k in admin(a, "GET", "/admin/keys").json()["data"]] == ["k"]


def test_a_node_that_misses_every_invalidation_still_catches_up(gateway: Start, redis_url: str) -> None:
    """B may not subscribe (a Redis ACL): a new key works there through the miss lookup,
    and a revocation reaches it through the version check, within ``RESYNC_INTERVAL``."""
    r = redis.Redis.from_url(redis_url)
    r.execute_command("ACL", "SETUSER", "deaf", "reset", "on", ">pw", "~*", "resetchannels", "+@all")
    try:
        deaf_url = redis_url.replace("redis://", "redis://deaf:pw@")
        a = gateway(config(redis_url), env=ENV)
        b = gateway(config(deaf_url), env=ENV)
        [(_, subscribers)] = r.pubsub_numsub("hapax:c1:keys:changes")
        assert subscribers == 1  # A only: B hears of no change
        secret, key_id = make_key(a)
        assert call(b, secret) == "ok"
        # Every route that takes a key asks Redis about one it does not know: /v1/me, an
        # operator view, the admin API.
        ops, _ = make_key(a, name="ops", role="operator")
        r1 = httpx.get(b.url + "/v1/health/providers", headers={"authorization": f"Bearer {ops}"}, timeout=10)
        assert r1.status_code == 200, r1.text
        mine, _ = make_key(a, name="me")
        r2 = httpx.get(b.url + "/v1/me", headers={"authorization": f"Bearer {mine}"}, timeout=10)
        assert (r2.status_code, r2.json().get("name")) == (200, "me"), r2.text
        boss, _ = make_key(a, name="boss", role="admin")
        r3 = httpx.get(b.url + "/admin/whoami", headers={"authorization": f"Bearer {boss}"}, timeout=10)
        assert (r3.status_code, r3.json().get("name")) == (200, "boss"), r3.text
        assert admin(a, "DELETE", f"/admin/keys/{key_id}").status_code == 200
        exc = until(lambda: refused(b, secret), "B refuses the revoked key", timeout=RESYNC_INTERVAL * 3)
        assert "revoked" in exc.message
    finally:
        r.execute_command("ACL", "DELUSER", "deaf")
        r.close()


def test_a_flood_of_one_bad_key_is_a_few_redis_lookups(gateway: Start, redis_url: str) -> None:
    a = gateway(config(redis_url), env=ENV)
    r = redis.Redis.from_url(redis_url)
    r.config_resetstat()
    bad = "hpx_" + "x" * 43
    started = time.monotonic()
    with httpx.Client(base_url=a.url, headers={"authorization": f"Bearer {bad}"}, timeout=10) as c:
        for _ in range(100):
            resp = c.post("/v1/chat/completions", json={"model": "demo", "messages": MSG})
            assert resp.status_code == 401 and resp.json()["error"]["message"] == "invalid API key"
    elapsed = time.monotonic() - started
    lookups = int(r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))
    r.close()
    # One lookup per NEGATIVE_TTL at most (plus the first), however many requests came.
    assert 1 <= lookups <= 2 + elapsed / NEGATIVE_TTL


def test_known_keys_are_answered_without_asking_redis(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url)
    secret, _ = make_key(a)
    assert call(b, secret) == "ok"
    r = redis.Redis.from_url(redis_url)
    r.config_resetstat()
    for gw in (a, b):
        for _ in range(20):
            assert call(gw, secret) == "ok"
    stats = r.info("commandstats")
    r.close()
    # No per-request key lookups (the key store reads with HMGET/HGETALL only): last-used
    # times and usage go out once a flush interval, as HSET and HINCRBY. (EVALSHA calls are
    # the shared limits' and slots' reservations, not the key store's.)
    assert not {"cmdstat_hmget", "cmdstat_hgetall"} & set(stats)


def _usage(gw: GatewayProcess, query: str = "") -> dict[str, Any]:
    r = admin(gw, "GET", "/admin/usage" + query)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_usage_from_both_nodes_is_summed_on_either(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url, usage={"retention_days": 3})
    secret, key_id = make_key(a, name="shared")
    for _ in range(2):
        assert call(a, secret) == "ok"
    for _ in range(3):
        assert call(b, secret) == "ok"
    until(lambda: _usage(a)["totals"]["requests"] == 5, "A shows all 5 calls")
    for gw in (a, b):
        body = until(lambda gw=gw: (u := _usage(gw))["totals"]["requests"] == 5 and u, "5 calls on each node")
        [row] = body["data"]
        assert (row["key"], row["key_name"], row["model"], row["requests"]) == (key_id, "shared", "demo", 5)
        assert row["prompt_tokens"] == 5 * 5 and row["completion_tokens"] == 5 * 1
        assert row["cost_usd"] == pytest.approx(5 * (5 * 0.001 + 1 * 0.002))
        me = client(gw, secret).get("/me", cast_to=httpx.Response).json()
        assert me["usage"]["today"]["requests"] == 5
    text = admin(b, "GET", "/admin/usage?format=csv&group_by=key").text
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert (row["key"], row["requests"], row["key_name"]) == (key_id, "5", "shared")
    out = hapax_cli("usage", "--url", a.url, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert '"requests": 5' in out.stdout
    # Every usage key in Redis expires with the retention (3 days after its day ends, at most 4 from now).
    r = redis.Redis.from_url(redis_url)
    usage_keys = list(r.scan_iter("hapax:c1:usage:*"))
    assert len(usage_keys) == 2  # the day index and today's hash
    assert all(0 < r.ttl(k) <= 4 * 86400 for k in usage_keys)
    r.close()


def test_sigterm_flushes_pending_usage_to_redis(gateway: Start, redis_url: str) -> None:
    # A flushes every 10 minutes: only the shutdown flush can bring its calls to B.
    a = gateway(config(redis_url, usage={"flush_interval": 600}), env=ENV)
    b = gateway(config(redis_url), env=ENV)
    secret, _ = make_key(b)
    for _ in range(3):
        assert call(a, secret) == "ok"
    a.signal(signal.SIGTERM)
    assert a.proc is not None and a.proc.wait(30) == 0
    assert _usage(b)["totals"]["requests"] == 3


def test_redis_down_at_write_time_is_a_clear_503(gateway: Start) -> None:
    redis_ = RedisServer().start()  # its own server: stopping it must not disturb other tests
    try:
        a = gateway(config(redis_.url), env=ENV)
        secret, _ = make_key(a, name="before")
        assert redis_.proc is not None
        for outage in ("hung", "down"):
            if outage == "hung":
                redis_.proc.send_signal(signal.SIGSTOP)  # no answers: every call runs into its timeout
            else:
                redis_.stop()  # connections refused
            r = admin(a, "POST", "/admin/keys", json={"name": "during"})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert (err["code"], err["type"]) == ("key_store_unavailable", "api_error")
            assert "Redis" in err["message"] and "state.redis.timeout" in err["message"]
            assert call(a, secret) == "ok"  # a known key keeps working from the local copy
            u = admin(a, "GET", "/admin/usage")
            assert (u.status_code, u.json()["error"]["code"]) == (503, "usage_store_unavailable")
            if outage == "hung":
                redis_.proc.send_signal(signal.SIGCONT)
                created = until(
                    lambda: (r := admin(a, "POST", "/admin/keys", json={"name": "after"})).status_code == 201 and r,
                    "key writes work once Redis answers",
                )
                names = [k["name"] for k in admin(a, "GET", "/admin/keys").json()["data"]]
                assert names == ["before", "after"]  # nothing of the refused write was kept
                assert call(a, created.json()["key"]) == "ok"
    finally:
        if redis_.proc is not None:
            redis_.proc.send_signal(signal.SIGCONT)
        redis_.stop()


def test_cli_with_url_works_against_either_node(gateway: Start, redis_url: str) -> None:
    a, b = pair(gateway, redis_url)
    out = hapax_cli("keys", "create", "--url", a.url, "--name", "cli-key", "--json")
    assert out.returncode == 0, out.stderr
    import orjson

    made = orjson.loads(out.stdout)
    assert call(b, made["key"]) == "ok"
    listed = hapax_cli("keys", "list", "--url", b.url, "--json")
    assert listed.returncode == 0 and made["id"] in listed.stdout
    out = hapax_cli("keys", "revoke", "cli-key", "--url", b.url)
    assert out.returncode == 0, out.stderr
    until(lambda: refused(a, made["key"]), "A refuses the key revoked through B")


def test_local_cli_on_a_redis_config_changes_what_the_nodes_see(gateway: Start, redis_url: str) -> None:
    import orjson

    a, b = pair(gateway, redis_url)
    out = hapax_cli("keys", "create", "-c", str(a.config_path), "--name", "from-cli", "--json")
    assert out.returncode == 0, out.stderr
    made = orjson.loads(out.stdout)
    assert call(b, made["key"]) == "ok" and call(a, made["key"]) == "ok"
    state = a.config_path.parent / "state"
    assert not (state / "keys" / "keys.json").exists()  # it went to Redis, not to the state directory

    def cli_usage() -> Any:
        out = hapax_cli("usage", "-c", str(a.config_path), "--format", "json", "--key", "from-cli")
        assert out.returncode == 0, out.stderr
        body = orjson.loads(out.stdout)
        return body["totals"]["requests"] == 2 and body

    until(cli_usage, "the local CLI reads both nodes' usage from Redis")
    out = hapax_cli("keys", "revoke", "-c", str(a.config_path), "from-cli")
    assert out.returncode == 0, out.stderr
    until(lambda: refused(b, made["key"]), "B refuses the key the CLI revoked")
