"""What a key holder can learn about their own key (``GET /v1/me``), and the state directory's privacy."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.gateway_process import GatewayProcess
from tests.test_access_http import ENV, admin, chat, config, make_key
from tests.test_cli import ISO


def me(gw: GatewayProcess, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(gw.url + "/v1/me", headers=headers, timeout=10)


def test_a_developer_key_reads_its_own_limits_budget_and_usage(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(teams={"alpha": {"budget": {"monthly_usd": 5}}}), env=ENV)
    dev, dev_id = make_key(gw, name="dev", team="alpha", models=["demo"],
                           limits={"requests_per_minute": 10, "concurrent": 3},
                           budget={"daily_usd": 1.0, "daily_tokens": 1000})
    other, _ = make_key(gw, name="other")
    assert chat(gw, dev).status_code == 200
    assert chat(gw, other).status_code == 200

    # A developer may not read everyone's usage, but may read its own.
    assert admin(gw, "GET", "/admin/usage", key=dev).status_code == 403
    r = me(gw, dev)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["name"], body["role"], body["team"]) == (dev_id, "dev", "developer", "alpha")
    assert body["models"] == ["demo"]
    assert ISO.match(body["created_at"]) and ISO.match(body["last_used_at"]) and body["expires_at"] is None
    key_limits = next(x for x in body["limits"] if x["scope"] == "key")
    assert key_limits["requests_per_minute"]["limit"] == 10
    assert key_limits["requests_per_minute"]["remaining"] == 9
    assert key_limits["concurrent"] == {"limit": 3, "in_flight": 0, "remaining": 3}
    key_budget = next(b for b in body["budget"] if b["scope"] == "key")
    spent = key_budget["daily_usd"]["used"]
    assert spent > 0 and key_budget["daily_usd"]["remaining"] == round(1.0 - spent, 8)
    assert key_budget["daily_tokens"]["used"] > 0
    team_budget = next(b for b in body["budget"] if b["scope"] == "team")
    assert team_budget["monthly_usd"]["used"] == spent  # only dev spent in alpha
    assert body["usage"]["today"]["requests"] == 1 and body["usage"]["month"]["cost_usd"] == spent
    # Its own only: the other key's call is not in it.
    assert me(gw, other).json()["usage"]["today"]["requests"] == 1

    assert me(gw, None).status_code == 401
    assert me(gw, "hpx_" + "x" * 43).status_code == 401
    assert httpx.post(gw.url + "/v1/me", headers={"authorization": f"Bearer {dev}"}).status_code == 405


def test_state_dir_is_created_private_and_a_loose_one_is_warned_about(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = gateway(config(), env=ENV)
    state = gw.config_path.parent / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert "open to group or others" not in gw.logs()

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    gw2 = gateway(config(auth={"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}", "state_dir": str(loose)}),
                  env=ENV)
    assert f"auth.state_dir {loose} is open to group or others (mode 755)" in gw2.logs()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o755  # warned about, not changed behind the operator's back
