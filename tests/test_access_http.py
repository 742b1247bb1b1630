"""Keys, roles, limits, budgets, usage and audit, shown through a running gateway.

Every test starts a real ``python -m node serve`` and talks to it with the
official openai SDK or httpx. The upstream is the ``mock`` provider (fixed
reply, so token counts are known) or the scripted OpenAI upstream when a test
must see what reached the provider.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway_process import ROOT, GatewayProcess
from tests.upstreams.server import UpstreamServer, UpstreamState

ADMIN_KEY = "hpx_admin_" + "A" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
MSG = [{"role": "user", "content": "hi"}]  # estimate: 4 + 1 = 5 prompt tokens
ROLES = ("admin", "operator", "developer", "viewer")


def config(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}", "state_dir": "state"},
        "providers": {
            "mock": {"type": "mock", "mock": {"reply": "ok"}},
            # Slow enough that a whole burst is in flight at once: nothing settles mid-burst.
            "slow": {"type": "mock", "mock": {"reply": "ok", "latency_ms": 600}},
        },
        "models": [
            {"name": "demo", "provider": "mock", "aliases": ["demo-alias"]},
            {"name": "other", "provider": "mock"},
            {"name": "slow", "provider": "slow"},
        ],
        # 1 token costs $0.001 in and $0.002 out: costs are easy to read.
        "pricing": {m: {"input": 1000.0, "output": 2000.0} for m in ("demo", "other", "slow")},
    }
    cfg.update(extra)
    return cfg


def admin(gw: GatewayProcess, method: str, path: str, *, key: str = ADMIN_KEY, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {key}"}, timeout=10, **kw)


def make_key(gw: GatewayProcess, **spec: Any) -> tuple[str, str]:
    spec.setdefault("name", "k")
    r = admin(gw, "POST", "/admin/keys", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


def chat(gw: GatewayProcess, key: str | None, model: str = "demo", **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers, timeout=10,
                      json={"model": model, "messages": MSG, **body})


async def burst(
    gw: GatewayProcess, keys: list[str], n: int, model: str = "demo", **body: Any
) -> list[httpx.Response]:
    """``n`` calls at once, round-robin over ``keys``; every wait bounded."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=gw.url, timeout=15, limits=limits) as c:
        async def one(i: int) -> httpx.Response:
            return await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {keys[i % len(keys)]}"},
                                json={"model": model, "messages": MSG, **body})
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 30)


def settled_usage(gw: GatewayProcess, query: str, requests: int) -> list[dict[str, Any]]:
    """``/admin/usage`` rows once ``requests`` calls are in them: a stream settles just after its last byte."""
    deadline = time.monotonic() + 10
    while True:
        body = admin(gw, "GET", "/admin/usage?" + query).json()
        if body["totals"]["requests"] >= requests or time.monotonic() > deadline:
            return list(body["data"])
        time.sleep(0.05)


def statuses(rs: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rs:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def audit_events(gw: GatewayProcess) -> list[dict[str, Any]]:
    import orjson

    d = gw.config_path.parent / "state" / "audit"
    return [orjson.loads(line) for f in sorted(d.glob("audit*.jsonl")) for line in f.read_bytes().splitlines()]


def audit_until(gw: GatewayProcess, pred: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The audit events once ``pred`` holds for them: a node writes them from a background thread."""
    deadline = time.monotonic() + 10
    while True:
        events = audit_events(gw)
        if pred(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def hapax_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# -- keys and authentication -------------------------------------------------------------


def test_keys_authenticate_rotate_revoke_and_persist(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = openai_upstream
    cfg = config()
    cfg["providers"]["up"] = {"type": "openai", "base_url": server.url + "/v1", "api_key": "sk-upstream-secret"}
    cfg["models"].append({"name": "gpt-4o-mini", "provider": "up"})
    gw = gateway(cfg, env=ENV)

    missing = chat(gw, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as info, openai.OpenAI(
        base_url=gw.url + "/v1", api_key="hpx_" + "x" * 43, max_retries=0
    ) as wrong:
        wrong.chat.completions.create(model="demo", messages=MSG)  # type: ignore[arg-type]
    assert info.value.code == "invalid_api_key"

    secret, key_id = make_key(gw, name="svc", owner="ana", team="alpha")
    assert secret.startswith("hpx_") and len(secret) >= 4 + 43
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0) as client:
        r = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Hello from upstream!"
    # x-api-key (the anthropic SDK's header) works too; neither credential goes upstream.
    r2 = httpx.post(gw.url + "/v1/chat/completions", timeout=10, headers={"x-api-key": secret},
                    json={"model": "gpt-4o-mini", "messages": MSG})
    assert r2.status_code == 200
    for seen in state.seen[-2:]:
        assert seen.headers["Authorization"] == "Bearer sk-upstream-secret"
        assert "x-api-key" not in {k.lower() for k in seen.headers}
        assert secret not in str(seen.headers)

    shown = admin(gw, "GET", f"/admin/keys/{key_id}").json()
    assert shown["team"] == "alpha" and shown["last_used_at"] is not None
    assert "hash" not in shown and secret not in str(shown)

    rotated = admin(gw, "POST", f"/admin/keys/{key_id}/rotate").json()["key"]
    assert chat(gw, secret).status_code == 401
    assert chat(gw, rotated).status_code == 200

    # Keys survive a restart; the store holds hashes only.
    store = (gw.config_path.parent / "state" / "keys" / "keys.json").read_text()
    assert rotated not in store and secret not in store
    gw.stop()
    gw.start()
    assert chat(gw, rotated).status_code == 200

    assert admin(gw, "POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    r3 = chat(gw, rotated)
    assert r3.status_code == 401 and "revoked" in r3.json()["error"]["message"]
    listed = admin(gw, "GET", "/admin/keys").json()["data"]
    assert key_id not in [k["id"] for k in listed]
    assert key_id in [k["id"] for k in admin(gw, "GET", "/admin/keys?include_revoked=true").json()["data"]]

    expired, _ = make_key(gw, name="old", expires_at=time.time() - 1)
    assert chat(gw, expired).status_code == 401


def test_cli_manages_the_local_store_of_a_running_node(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(), env=ENV)
    made = hapax_cli("keys", "create", "--config", str(gw.config_path), "--name", "from-cli", "--team", "beta",
                     "--models", "demo", env=ENV)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    key_id = made.stderr.split("id: ")[1].split()[0]
    assert chat(gw, secret).status_code == 200
    assert chat(gw, secret, model="other").status_code == 403
    listed = hapax_cli("keys", "list", "--config", str(gw.config_path), env=ENV)
    assert key_id in listed.stdout and secret not in listed.stdout
    # Remote mode, through the admin API.
    rot = hapax_cli("keys", "rotate", key_id, "--url", gw.url, env=ENV)
    assert rot.returncode == 0, rot.stderr
    assert chat(gw, secret).status_code == 401
    new = rot.stdout.strip()
    assert chat(gw, new).status_code == 200
    rev = hapax_cli("keys", "revoke", key_id, "--config", str(gw.config_path), env=ENV)
    assert rev.returncode == 0, rev.stderr
    assert chat(gw, new).status_code == 401  # revoked by the CLI: refused on the very next call
    bad = hapax_cli("keys", "revoke", "key_0000000000000000", "--url", gw.url, "--admin-key", "nope" * 10)
    assert bad.returncode == 1 and "invalid API key" in bad.stderr


# -- roles ---------------------------------------------------------------------------------


def test_role_matrix_through_http(gateway: Callable[..., GatewayProcess]) -> None:
    from hapax.access._roles import ROLE_PERMISSIONS, Permission

    gw = gateway(config(), env=ENV)
    keys = {role: make_key(gw, name=role, role=role, team="alpha")[0] for role in ROLES}
    _, target = make_key(gw, name="target")
    # One probe per permission; each must succeed exactly for the roles that hold it.
    probes: list[tuple[Permission, Callable[[str], httpx.Response]]] = [
        (Permission.CALL_MODELS, lambda k: chat(gw, k)),
        (Permission.READ_USAGE, lambda k: admin(gw, "GET", "/admin/usage", key=k)),
        (Permission.READ_USAGE, lambda k: admin(gw, "GET", "/admin/usage?format=csv", key=k)),
        (Permission.MANAGE_KEYS, lambda k: admin(gw, "GET", "/admin/keys", key=k)),
        (Permission.MANAGE_KEYS, lambda k: admin(gw, "POST", "/admin/keys", key=k, json={"name": "x"})),
        (Permission.MANAGE_KEYS, lambda k: admin(gw, "GET", f"/admin/keys/{target}", key=k)),
        (Permission.MANAGE_KEYS, lambda k: admin(gw, "PATCH", f"/admin/keys/{target}", key=k,
                                                 json={"owner": "x"})),
        (Permission.MANAGE_KEYS, lambda k: admin(gw, "POST", f"/admin/keys/{target}/rotate", key=k)),
        (Permission.MANAGE_CONFIG, lambda k: admin(gw, "GET", "/admin/config", key=k)),
        (Permission.VIEW_CLUSTER, lambda k: admin(gw, "GET", "/admin/cluster", key=k)),
        # Outside /admin but an operator's view all the same: upstream errors, load, breakers.
        (Permission.VIEW_CLUSTER, lambda k: admin(gw, "GET", "/v1/health/providers", key=k)),
    ]
    for role, key in keys.items():
        for perm, probe in probes:
            r = probe(key)
            if perm in ROLE_PERMISSIONS[role]:
                assert r.status_code in (200, 201), (role, perm, r.text)
            else:
                assert r.status_code == 403, (role, perm, r.text)
                assert r.json()["error"]["type"] == "permission_error"
        who = admin(gw, "GET", "/admin/whoami", key=key).json()
        assert who["role"] == role
    # Revoke last, with the admin key, then nobody can use it.
    assert admin(gw, "DELETE", f"/admin/keys/{target}", key=keys["operator"]).status_code == 403
    assert admin(gw, "DELETE", f"/admin/keys/{target}", key=keys["admin"]).status_code == 200
    # No credential at all is 401 on the admin API, whatever the route, and on the health view.
    assert httpx.get(gw.url + "/admin/keys", timeout=10).status_code == 401
    for headers in ({}, {"authorization": "Bearer hpx_" + "n" * 43}, {"x-api-key": "nope"}):
        r = httpx.get(gw.url + "/v1/health/providers", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    health = admin(gw, "GET", "/v1/health/providers", key=keys["viewer"]).json()
    assert {d["deployment"] for d in health["deployments"]} == {"mock/demo", "mock/other", "slow/slow"}
    assert admin(gw, "GET", "/v1/health/providers").status_code == 200  # the bootstrap admin key
    def denied_health(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e["event"] == "admin.denied" and e["details"]["path"] == "/v1/health/providers"]

    denied = denied_health(audit_until(gw, lambda evs: bool(denied_health(evs))))
    assert {e["details"]["needs"] for e in denied} == {"view_cluster"} and len(denied) == 1  # the developer
    # The redacted config never shows the admin key.
    assert ADMIN_KEY not in admin(gw, "GET", "/admin/config").text


def test_model_allowlist_and_role_changes(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(), env=ENV)
    secret, key_id = make_key(gw, name="narrow", models=["demo"])
    assert chat(gw, secret, model="demo").status_code == 200
    assert chat(gw, secret, model="demo-alias").status_code == 200  # an alias of an allowed model
    r = chat(gw, secret, model="other")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    bad = admin(gw, "POST", "/admin/keys", json={"name": "x", "models": ["nope"]})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    # Demote to viewer: model calls stop at once.
    assert admin(gw, "PATCH", f"/admin/keys/{key_id}", json={"role": "viewer"}).status_code == 200
    assert chat(gw, secret).status_code == 403
    ev = [e for e in audit_until(gw, lambda evs: any(e["event"] == "key.role_changed" for e in evs))
          if e["event"] == "key.role_changed"]
    assert ev and ev[-1]["details"] == {"from": "developer", "to": "viewer"} and ev[-1]["target"] == key_id


def test_auth_none_warns_and_admin_still_needs_the_admin_key(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = config()
    cfg["auth"] = {"mode": "none", "admin_key": "${HAPAX_ADMIN_KEY}"}
    gw = gateway(cfg, env=ENV)
    assert chat(gw, None).status_code == 200
    assert "AUTH IS OFF" in gw.logs()
    # The operators' health view stays open with auth off, like the rest of the demo.
    health = httpx.get(gw.url + "/v1/health/providers", timeout=10)
    assert health.status_code == 200 and "deployments" in health.json()
    assert httpx.get(gw.url + "/admin/keys", timeout=10).status_code == 401
    assert admin(gw, "GET", "/admin/keys").status_code == 200


# -- rate limits ---------------------------------------------------------------------------


def test_request_rate_limits_are_exact_under_concurrency(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = config(teams={"alpha": {"limits": {"requests_per_minute": 60, "request_burst": 7}}})
    gw = gateway(cfg, env=ENV)
    k1, _ = make_key(gw, name="a1", team="alpha", limits={"requests_per_minute": 60, "request_burst": 5})
    k2, _ = make_key(gw, name="a2", team="alpha")
    rs = asyncio.run(burst(gw, [k1], 20))
    assert statuses(rs) == {200: 5, 429: 15}
    limited = next(r for r in rs if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.json()["error"]["param"] == "key.requests_per_minute"
    ok = [r for r in rs if r.status_code == 200]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    assert all(r.headers["x-ratelimit-limit-requests"] == "60" for r in ok)
    # The team bucket (7) took 5 from a1: a2 gets exactly the other 2.
    rs2 = asyncio.run(burst(gw, [k2], 10))
    assert statuses(rs2) == {200: 2, 429: 8}
    assert next(r for r in rs2 if r.status_code == 429).json()["error"]["param"] == "team.requests_per_minute"


def test_token_and_concurrency_limits(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(), env=ENV)
    # Each call reserves 5 (prompt) + 10 (max_tokens) = 15 tokens, and really uses 5 + 1 = 6.
    ktok, _ = make_key(gw, name="tok", limits={"tokens_per_minute": 100})
    # The slow model keeps all 20 in flight together, so none is reconciled mid-burst.
    rs = asyncio.run(burst(gw, [ktok], 20, model="slow", max_tokens=10))
    assert statuses(rs) == {200: 6, 429: 14}
    assert next(r for r in rs if r.status_code == 429).json()["error"]["param"] == "key.tokens_per_minute"
    # Reconciled: 6 calls used 36, so about 64 remain (plus a little refill), not 10.
    r = chat(gw, ktok, max_tokens=10)
    assert r.status_code == 200
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 64 - 15 <= remaining <= 64 - 15 + 5
    # Streaming is reconciled too, from the final usage.
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=10,
                      headers={"authorization": f"Bearer {ktok}"},
                      json={"model": "demo", "messages": MSG, "max_tokens": 10, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["x-ratelimit-limit-tokens"] == "100"
        body = s.read().decode()
    assert "[DONE]" in body
    r = chat(gw, ktok, max_tokens=10)
    # Two more calls used 6 each (the stream too, not its 15 reserved), then this one reserved 15.
    assert 64 - 6 - 6 - 15 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 64 - 6 - 6 - 15 + 5

    kcon, _ = make_key(gw, name="con", limits={"concurrent": 3})

    async def slow_burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=15,
                                     limits=httpx.Limits(max_connections=10)) as c:
            calls = [c.post("/v1/chat/completions", headers={"authorization": f"Bearer {kcon}"},
                            json={"model": "slow", "messages": MSG}) for _ in range(10)]
            return await asyncio.wait_for(asyncio.gather(*calls), 30)

    rs = asyncio.run(slow_burst())
    assert statuses(rs) == {200: 3, 429: 7}
    assert next(r for r in rs if r.status_code == 429).json()["error"]["code"] == "concurrency_limit_exceeded"
    assert chat(gw, kcon, model="slow").status_code == 200  # slots came back


def test_refused_and_failed_answers_carry_ratelimit_headers(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = config()
    cfg["providers"]["broken"] = {"type": "mock", "mock": {"failure_rate": 1.0}}
    cfg["models"].append({"name": "broken", "provider": "broken"})
    gw = gateway(cfg, env=ENV)
    limits = {"requests_per_minute": 60, "request_burst": 2, "tokens_per_minute": 1000}
    key, _ = make_key(gw, name="paced", limits=limits)

    # Each call reserves 5 + 10 tokens and really uses 5 + 1.
    assert chat(gw, key, max_tokens=10).status_code == 200
    assert chat(gw, key, max_tokens=10).status_code == 200
    limited = chat(gw, key, max_tokens=10)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    h = limited.headers
    assert int(h["retry-after"]) >= 1
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+(ms|s)", h["x-ratelimit-reset-requests"])
    assert h["x-ratelimit-limit-tokens"] == "1000"
    # Nothing was taken for the refused call: 1000 less the two calls' 6 tokens each (plus refill).
    assert 988 <= int(h["x-ratelimit-remaining-tokens"]) <= 1000
    assert "x-ratelimit-reset-tokens" in h

    # A quota refusal carries them too, with Retry-After at the end of the day.
    quota, _ = make_key(gw, name="quota", limits=limits, budget={"daily_tokens": 20})
    assert chat(gw, quota, max_tokens=10).status_code == 200  # 6 spent, then 6 + 15 > 20
    refused = chat(gw, quota, max_tokens=10)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    h = refused.headers
    assert 1 <= int(h["retry-after"]) <= 86400
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "1"
    assert h["x-ratelimit-limit-tokens"] == "1000" and "x-ratelimit-reset-tokens" in h

    # Concurrency refusals and upstream failures after admission report the buckets as well.
    busy, _ = make_key(gw, name="busy", limits={"concurrent": 1, "requests_per_minute": 600})

    async def two_slow() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=15) as c:
            calls = [c.post("/v1/chat/completions", headers={"authorization": f"Bearer {busy}"},
                            json={"model": "slow", "messages": MSG}) for _ in range(2)]
            return await asyncio.wait_for(asyncio.gather(*calls), 30)

    rs = asyncio.run(two_slow())
    assert statuses(rs) == {200: 1, 429: 1}
    over = next(r for r in rs if r.status_code == 429)
    assert over.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert over.headers["x-ratelimit-limit-requests"] == "600" and "retry-after" in over.headers
    failed = chat(gw, busy, model="broken")
    assert failed.status_code == 502 and failed.headers["x-ratelimit-limit-requests"] == "600"


# -- budgets, cost, usage ------------------------------------------------------------------


def test_budgets_hold_under_concurrency_and_usage_adds_up(gateway: Callable[..., GatewayProcess]) -> None:
    # A call: 5 prompt tokens ($0.005) + 1 completion token ($0.002) = $0.007; reserved with
    # max_tokens=2: 5 + 2 tokens, $0.009.
    cfg = config(teams={"alpha": {"budget": {"daily_usd": 0.05}}, "beta": {}})
    gw = gateway(cfg, env=ENV)
    a1, a1_id = make_key(gw, name="a1", team="alpha")
    a2, _ = make_key(gw, name="a2", team="alpha")
    b1, b1_id = make_key(gw, name="b1", team="beta", budget={"daily_tokens": 30})

    rs = asyncio.run(burst(gw, [a1, a2], 12, model="slow", max_tokens=2))
    # $0.05 fits five $0.009 reservations, not six: exactly five admitted at once.
    assert statuses(rs) == {200: 5, 429: 7}
    refused = next(r for r in rs if r.status_code == 429).json()["error"]
    assert refused["code"] == "insufficient_quota" and refused["param"] == "team.daily_usd"
    assert "daily_usd" in refused["message"] and "alpha" in refused["message"]
    ok = next(r for r in rs if r.status_code == 200)
    assert float(ok.headers["x-hapax-cost-usd"]) == pytest.approx(0.007)
    # Settled at $0.035: one more fits ($0.044 with its reservation), then the cap holds.
    assert chat(gw, a1, max_tokens=2).status_code == 200
    assert chat(gw, a2, max_tokens=2).status_code == 429

    rs = asyncio.run(burst(gw, [b1], 10, model="slow", max_tokens=2))
    assert statuses(rs) == {200: 4, 429: 6}  # 30 tokens fit four 7-token reservations
    assert next(r for r in rs if r.status_code == 429).json()["error"]["param"] == "key.daily_tokens"

    usage = admin(gw, "GET", "/admin/usage?team=alpha").json()
    assert usage["totals"]["requests"] == 6 and {r["model"] for r in usage["data"]} == {"demo", "slow"}
    assert usage["totals"]["cost_usd"] == pytest.approx(0.042)
    assert usage["totals"]["cost_usd"] <= 0.05
    assert usage["totals"]["total_tokens"] == 36
    by_key = admin(gw, "GET", f"/admin/usage?key={b1_id}&model=slow").json()
    assert by_key["totals"]["total_tokens"] == 24 and by_key["data"][0]["team"] == "beta"
    day = usage["data"][0]["day"]
    assert admin(gw, "GET", f"/admin/usage?from={day}&to={day}").json()["totals"]["requests"] == 10
    assert admin(gw, "GET", "/admin/usage?to=2000-01-01").json()["data"] == []
    csv = admin(gw, "GET", f"/admin/usage?format=csv&key={a1_id}").text.splitlines()
    assert csv[0].startswith("day,key,team,model,deployment,requests") and a1_id in csv[1]

    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    cost_line = next(line for line in metrics.splitlines()
                     if line.startswith('hapax_cost_usd_total{model="slow",team="alpha"}'))
    assert float(cost_line.split()[-1]) == pytest.approx(0.035)
    assert 'hapax_limited_total{limit="daily_usd",scope="team"}' in metrics
    assert 'hapax_team_requests_total{model="slow",team="beta"} 4' in metrics

    # Budgets survive a restart: spend is rebuilt from the usage ledger.
    gw.stop()
    gw.start()
    assert chat(gw, a1, max_tokens=2).status_code == 429
    assert chat(gw, b1, max_tokens=2).status_code == 429


def test_cost_header_and_streamed_cost_follow_the_price_table(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = config()
    cfg["providers"]["words"] = {"type": "mock", "mock": {"reply": "one two three four five"}}
    cfg["models"] += [{"name": "priced", "provider": "words"}, {"name": "unpriced", "provider": "words"}]
    # A configured override; at these prices every token count has an exact 8-decimal cost.
    cfg["pricing"]["priced"] = {"input": 1500.0, "output": 7000.0}
    gw = gateway(cfg, env=ENV)
    secret, key_id = make_key(gw, name="costs")
    msgs: Any = MSG

    def price(prompt: int, completion: int) -> float:
        return (prompt * 1500 + completion * 7000) / 1_000_000

    with openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=20) as client:
        raw = client.chat.completions.with_raw_response.create(model="priced", messages=msgs)
        usage = raw.parse().usage
        assert usage is not None and usage.completion_tokens == 5
        assert raw.headers["x-hapax-cost-usd"] == f"{price(usage.prompt_tokens, usage.completion_tokens):.8f}"
        # A model the table does not know costs 0, and still says so.
        free = client.chat.completions.with_raw_response.create(model="unpriced", messages=msgs)
        assert free.headers["x-hapax-cost-usd"] == "0.00000000"

        streamer, streamer_id = make_key(gw, name="streamer")
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=streamer, max_retries=0, timeout=20) as sc:
            chunks = list(sc.chat.completions.create(
                model="priced", messages=msgs, stream=True, stream_options={"include_usage": True},
            ))
    reported = chunks[-1].usage
    assert reported is not None and reported.completion_tokens == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three four five"

    rows = settled_usage(gw, f"key={streamer_id}", 1)
    assert len(rows) == 1 and rows[0]["model"] == "priced" and rows[0]["requests"] == 1
    assert rows[0]["prompt_tokens"] == reported.prompt_tokens
    assert rows[0]["completion_tokens"] == reported.completion_tokens
    assert rows[0]["cost_usd"] == pytest.approx(price(reported.prompt_tokens, reported.completion_tokens), abs=1e-12)
    assert rows[0]["cost_usd"] > 0
    mine = admin(gw, "GET", f"/admin/usage?key={key_id}&model=unpriced").json()
    assert mine["totals"]["requests"] == 1 and mine["totals"]["cost_usd"] == 0


def test_anthropic_sdk_with_api_keys(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(), env=ENV)
    secret, key_id = make_key(gw, name="claude-user", models=["demo"])
    user: Any = [{"role": "user", "content": "hi"}]

    # The anthropic SDK sends its key as x-api-key.
    with anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=20) as ac:
        msg = ac.messages.create(model="demo", max_tokens=16, messages=user)
        assert msg.content[0].type == "text" and msg.content[0].text == "ok"
        with ac.messages.stream(model="demo", max_tokens=16, messages=user) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "ok" and final.stop_reason == "end_turn"

        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            ac.messages.create(model="other", max_tokens=16, messages=user)
        body: Any = denied.value.body
        assert denied.value.status_code == 403
        assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        assert "other" in body["error"]["message"] and body["request_id"].startswith("req_")

    with pytest.raises(anthropic.AuthenticationError) as bad, anthropic.Anthropic(
        base_url=gw.url, api_key="hpx_" + "q" * 43, max_retries=0, timeout=20
    ) as wrong:
        wrong.messages.create(model="demo", max_tokens=16, messages=user)
    body = bad.value.body
    assert body["type"] == "error" and body["error"] == {"type": "authentication_error",
                                                         "message": "invalid API key"}
    # No key at all: the SDK must be told to send none.
    no_auth: Any = {"Authorization": anthropic.Omit()}
    with pytest.raises(anthropic.AuthenticationError) as missing, anthropic.Anthropic(
        base_url=gw.url, api_key=None, default_headers=no_auth, max_retries=0, timeout=20
    ) as nokey:
        nokey.messages.create(model="demo", max_tokens=16, messages=user)
    body = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "x-api-key" in body["error"]["message"]

    # Limits answer in Anthropic's shape too, with the rate-limit headers.
    paced, _ = make_key(gw, name="paced", limits={"requests_per_minute": 60, "request_burst": 1})
    with anthropic.Anthropic(base_url=gw.url, api_key=paced, max_retries=0, timeout=20) as pc:
        pc.messages.create(model="demo", max_tokens=16, messages=user)
        with pytest.raises(anthropic.RateLimitError) as limited:
            pc.messages.create(model="demo", max_tokens=16, messages=user)
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    # Both calls were counted and charged from the tokens they reported ($1000 / $2000 per 1M).
    rows = settled_usage(gw, f"key={key_id}", 2)
    assert len(rows) == 1 and rows[0]["requests"] == 2 and rows[0]["errors"] == 0
    prompt = msg.usage.input_tokens + final.usage.input_tokens
    completion = msg.usage.output_tokens + final.usage.output_tokens
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (prompt, completion)
    assert rows[0]["cost_usd"] == pytest.approx((prompt * 1000 + completion * 2000) / 1_000_000, abs=1e-12)


# -- audit and hygiene ---------------------------------------------------------------------


def test_audit_log_complete_and_verifiable_and_secrets_never_logged(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    prompt = "my-private-prompt-text-9f3a"
    upstream_key, header_secret = "sk-upstream-key-" + "u" * 24, "org-header-secret-" + "h" * 16
    yaml_secret = "sk-yaml-" + "y" * 16  # short: PyYAML's quote of a line is cut to ~36 characters each side
    cfg = config(teams={"alpha": {"budget": {"daily_tokens": 14}}},
                 server={"cors": {"enabled": True, "allow_origins": ["*"]}})
    server, state = openai_upstream
    cfg["providers"]["up"] = {"type": "openai", "base_url": server.url + "/v1", "api_key": upstream_key,
                              "headers": {"openai-organization": header_secret}}
    cfg["models"].append({"name": "gpt-4o-mini", "provider": "up"})
    gw = gateway(cfg, env=ENV)
    secret, key_id = make_key(gw, name="svc", team="alpha")

    # Providers that quote the gateway's own credential back: none of it reaches the caller.
    caller, _ = make_key(gw, name="caller")
    state.always = {"status": 401, "message": f"Incorrect API key provided: {upstream_key}"}
    refused = chat(gw, caller, model="gpt-4o-mini")
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_auth_failed"
    state.always = {"status": 400, "message": f"bad headers: {header_secret} {upstream_key}"}
    bad = chat(gw, caller, model="gpt-4o-mini")
    assert bad.status_code == 400 and "[redacted]" in bad.json()["error"]["message"]
    state.always = None
    health = admin(gw, "GET", "/v1/health/providers").text
    shown = admin(gw, "GET", "/admin/config").text
    for text in (refused.text, bad.text, health, shown):
        assert upstream_key not in text and header_secret not in text and ADMIN_KEY not in text
    assert "sk-upstream-key" not in refused.text  # not even a masked prefix of it

    # A reload rejected for bad YAML names the line, but does not quote it.
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + f"k: {yaml_secret}: x\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "config reload rejected" not in gw.logs():
        time.sleep(0.1)
    assert "invalid YAML" in gw.logs()
    viewer, _ = make_key(gw, name="view", role="viewer")
    assert httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"}, timeout=10,
                      json={"model": "demo", "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 1}).status_code == 200
    assert chat(gw, secret, max_tokens=1).status_code == 429  # team daily_tokens used up
    assert chat(gw, "hpx_wrong_" + "z" * 40).status_code == 401
    assert admin(gw, "GET", "/admin/keys", key=viewer).status_code == 403
    assert admin(gw, "PATCH", f"/admin/keys/{key_id}", json={"role": "operator"}).status_code == 200
    rotated = admin(gw, "POST", f"/admin/keys/{key_id}/rotate").json()["key"]
    assert admin(gw, "POST", f"/admin/keys/{key_id}/revoke").status_code == 200
    cfg["limits"] = {"requests_per_minute": 1000}
    gw.write_config(cfg)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(e["event"] == "config.applied" for e in audit_events(gw)):
        time.sleep(0.1)

    # CORS: open for the API, closed for /admin.
    pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
    assert httpx.options(gw.url + "/v1/chat/completions", headers=pre, timeout=10).headers.get(
        "access-control-allow-origin") == "*"
    adm = httpx.options(gw.url + "/admin/keys", headers=pre, timeout=10)
    assert "access-control-allow-origin" not in adm.headers
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    gw.stop()

    events = audit_events(gw)
    kinds = {e["event"] for e in events}
    assert {"gateway.started", "key.created", "key.updated", "key.role_changed", "key.rotated", "key.revoked",
            "auth.failed", "budget.exhausted", "admin.request", "admin.denied", "config.applied"} <= kinds
    for e in events:
        assert {"seq", "ts", "event", "actor", "remote", "request_id", "prev", "hash"} <= e.keys()
    created = next(e for e in events if e["event"] == "key.created" and e["target"] == key_id)
    assert created["actor"] == "bootstrap-admin" and created["remote"] == "127.0.0.1"
    assert created["request_id"].startswith("req_")
    exhausted = next(e for e in events if e["event"] == "budget.exhausted")
    assert exhausted["target"] == "team:alpha" and exhausted["details"]["limit"] == "daily_tokens"

    audit_dir = gw.config_path.parent / "state" / "audit"
    ok = hapax_cli("audit", "verify", str(audit_dir))
    assert ok.returncode == 0 and "chain intact" in ok.stdout, ok.stderr
    live = audit_dir / "audit.jsonl"
    lines = live.read_text().splitlines()
    lines[3] = lines[3].replace('"actor":"bootstrap-admin"', '"actor":"someone-else"', 1).replace(
        '"actor":"unknown"', '"actor":"someone-else"', 1)
    assert lines[3] != live.read_text().splitlines()[3]
    live.write_text("\n".join(lines) + "\n")
    bad = hapax_cli("audit", "verify", str(audit_dir))
    assert bad.returncode == 1 and f"{live}:4: event altered" in bad.stderr

    # Hygiene: no key, admin key or prompt text anywhere in the gateway's log, audit or metrics.
    state = gw.config_path.parent / "state"
    texts = {"log": gw.logs(), "metrics": metrics,
             "state": "\n".join(p.read_text() for p in state.rglob("*") if p.is_file())}
    for where, text in texts.items():
        for needle in (secret, rotated, viewer, caller, ADMIN_KEY, prompt, "hpx_wrong_", upstream_key,
                       header_secret, yaml_secret):
            assert needle not in text, f"{needle[:12]}... leaked into {where}"
    assert key_id in texts["log"]  # the access log names the caller by key id


def test_state_paths(tmp_path: Path) -> None:
    from hapax import parse_config
    from node.server import state_dir

    cfg = parse_config({"auth": {"state_dir": "st"}})
    assert state_dir(cfg, tmp_path / "hapax.yaml") == tmp_path / "st"
    assert state_dir(parse_config({}), None) is None
