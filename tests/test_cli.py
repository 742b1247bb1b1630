"""The ``hapax`` command as an operator meets it: run as a process, read what it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.gateway_process import ROOT, GatewayProcess
from tests.test_access_http import ENV, admin, chat, config, make_key, settled_usage
from tests.upstreams.server import free_port


def hapax(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HAPAX_ADMIN_KEY", "HAPAX_DEBUG")}
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def _validate(tmp_path: Path, text: str | bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "hapax.yaml"
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    return hapax("config", "validate", str(f), *extra)


def test_validate_reports_every_error_with_suggestions(tmp_path: Path) -> None:
    r = _validate(tmp_path, """\
providers:
  p: {type: mock, bogus: 1}
  q: {type: openai, base_url: 'not a url'}
models:
  - {name: a, provider: p, alias: [x]}
  - {name: b, provider: p, strategy: weird}
  - {name: c, provider: nowhere}
server:
  port: -1
  reload_intervl: 3
""")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "error: models[0].alias: unknown key; did you mean 'aliases'?" in errors
    assert "error: server.reload_intervl: unknown key; did you mean 'reload_interval'?" in errors
    assert "error: providers.p.bogus: unknown key" in errors
    assert any(e.startswith("error: providers.q: base_url must be") for e in errors)
    assert any(e.startswith("error: models[1].strategy: unknown strategy 'weird'") for e in errors)
    assert any(e.startswith("error: server.port:") for e in errors)
    # Cross-checks are reported along with the rest, not after they are fixed.
    assert "error: models[2] (c): unknown provider 'nowhere'; defined: ['p', 'q']" in errors
    assert len(errors) == 7 and r.stderr.rstrip().endswith("7 errors")
    assert "Traceback" not in r.stderr


def test_validate_cross_checks_and_env_all_at_once(tmp_path: Path) -> None:
    r = _validate(tmp_path, """\
providers:
  p: {type: openai, api_key: '${HAPAX_TEST_UNSET_A}', base_url: '${HAPAX_TEST_UNSET_B}'}
models:
  - {name: a, provider: nope}
  - {name: a, provider: p}
""")
    assert r.returncode == 1
    assert "error: providers.p.api_key: environment variable HAPAX_TEST_UNSET_A is not set" in r.stderr
    assert "error: providers.p.base_url: environment variable HAPAX_TEST_UNSET_B is not set" in r.stderr
    # Cross-checks (they run once every key is valid) are reported all at once too.
    assert "models[0] (a): unknown provider 'nope'" in r.stderr
    assert "models[1]: name 'a' is already used by 'a'" in r.stderr


def test_validate_rewords_yaml_errors_with_line_and_column(tmp_path: Path) -> None:
    r = _validate(tmp_path, "providers:\n  p: {type: mock}\nmodels:\n\t- {name: a, provider: p}\n")
    assert r.returncode == 1
    assert "error: invalid YAML: line 4, column 1: a tab: YAML indents with spaces" in r.stderr
    r = _validate(tmp_path, "server:\n  host: a: b\n")
    assert "line 2, column 10: a ':' where no key can start" in r.stderr
    assert "a: b" not in r.stderr  # PyYAML's quote of the line (it may hold a secret) is left out
    # PyYAML would keep the second block silently and drop the first.
    r = _validate(tmp_path, "providers:\n  p: {type: mock}\nmodels: [{name: a, provider: p}]\n"
                            "providers:\n  q: {type: mock}\n")
    assert "error: invalid YAML: line 4, column 1: the key 'providers' is given twice in one mapping" in r.stderr
    # A merge key may still be overridden, as YAML means it.
    r = _validate(tmp_path, "providers:\n  base: &b {type: mock}\n  p: {<<: *b, type: mock}\n"
                            "models: [{name: a, provider: p}]\n")
    assert r.returncode == 0, r.stderr


def test_validate_refuses_empty_undecodable_and_useless_configs(tmp_path: Path) -> None:
    for text, needle in (
        ("", "error: the file is empty"),
        ("# just a comment\n", "error: the file holds no settings"),
        (b"models: \xff\n", "error: the file is not UTF-8"),
        ("models: " + "[" * 3000 + "]" * 3000 + "\n", "error: invalid YAML: nested too deep"),
        ("- a\n- b\n", "error: the config must be a mapping"),
        ("providers: {p: {type: mock}}\n", "error: models: none configured"),
        ("auth: {mode: keys}\nproviders: {p: {type: mock}}\nmodels: [{name: a, provider: p}]\n",
         "auth: mode keys needs auth.admin_key or auth.state_dir"),
    ):
        r = _validate(tmp_path, text)
        assert r.returncode == 1 and needle in r.stderr, (text, r.stderr)
        assert "ok" not in r.stdout and "Traceback" not in r.stderr


def test_validate_warnings_pass_unless_strict(tmp_path: Path) -> None:
    text = "providers: {p: {type: mock}}\nmodels: [{name: a, provider: p}]\n"
    r = _validate(tmp_path, text)
    assert r.returncode == 0 and r.stdout.startswith("ok: 1 providers, 1 models (1 warning(s))")
    assert "warning: auth.mode: none" in r.stderr
    assert _validate(tmp_path, text, "--strict").returncode == 1


# -- keys and usage against a running node ---------------------------------------------------

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_local_cli_needs_no_admin_key_and_names_keys_by_name(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(config(), env=ENV)
    cfg = str(gw.config_path)
    # No HAPAX_ADMIN_KEY in this environment: the local store needs none (docs/security.md).
    made = hapax("keys", "create", "-c", cfg, "--name", "bob")
    assert made.returncode == 0, made.stderr
    bob = made.stdout.strip()
    assert chat(gw, bob).status_code == 200
    listed = hapax("keys", "list", "-c", cfg, "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(k for k in orjson.loads(listed.stdout)["data"] if k["name"] == "bob")
    assert ISO.match(row["created_at"]), row  # last use reaches the file lazily; the node knows it now
    assert ISO.match(admin(gw, "GET", f"/admin/keys/{row['id']}").json()["last_used_at"])
    assert "bob" in hapax("keys", "list", "-c", cfg).stdout

    # By name, locally and through the admin API (a name with a space is URL-encoded).
    shown = hapax("keys", "show", "-c", cfg, "bob", "--json")
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["id"] == row["id"]
    assert hapax("keys", "create", "-c", cfg, "--name", "ci bot").returncode == 0
    remote = hapax("keys", "show", "--url", gw.url, "ci bot", "--json", env=ENV)
    assert remote.returncode == 0, remote.stderr
    assert orjson.loads(remote.stdout)["name"] == "ci bot"
    by_name = admin(gw, "GET", "/admin/keys/bob").json()
    assert by_name["id"] == row["id"] and ISO.match(by_name["created_at"])

    revoked = hapax("keys", "revoke", "-c", cfg, "bob")
    assert revoked.returncode == 0, revoked.stderr
    assert chat(gw, bob).status_code == 401

    # Every failure is one line and exit 1.
    _one_line_error(hapax("keys", "revoke", "-c", cfg, "nobody"), "no key with id or name 'nobody'")
    for _ in range(2):
        assert hapax("keys", "create", "-c", cfg, "--name", "dup").returncode == 0
    _one_line_error(hapax("keys", "rotate", "-c", cfg, "dup"), "2 keys are named 'dup'")
    assert admin(gw, "POST", "/admin/keys/dup/revoke").status_code == 409
    _one_line_error(hapax("keys", "list", "--url", gw.url), "--url needs an admin key")
    _one_line_error(hapax("keys", "list", "--url", f"http://127.0.0.1:{free_port()}", env=ENV), "cannot reach")
    _one_line_error(hapax("keys", "list", "-c", str(gw.config_path.parent / "missing.yaml")), "cannot read")
    _one_line_error(hapax("usage", "--url", gw.url, "--admin-key", "hpx_" + "x" * 43), "invalid API key")


def test_usage_counts_refusals_by_key_name_in_table_json_and_csv(gateway: Callable[..., GatewayProcess]) -> None:
    # The local CLI reads the ledger file, which the node writes every flush_interval.
    gw = gateway(config(usage={"flush_interval": 0.1}), env=ENV)
    cfg = str(gw.config_path)
    secret, key_id = make_key(gw, name="ana", team="alpha", limits={"requests_per_minute": 2})
    codes = [chat(gw, secret).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    settled_usage(gw, f"key={key_id}", 2)

    # The admin API: ?key= takes the name; the refusal is a row count, not a request. Rows are
    # per deployment too: a refusal never reached one, so it has a row of its own.
    body = admin(gw, "GET", "/admin/usage?key=ana").json()
    assert [(r["key"], r["key_name"], r["deployment"], r["requests"], r["refused"]) for r in body["data"]] == [
        (key_id, "ana", "", 0, 1), (key_id, "ana", "mock/demo", 2, 0)]
    assert body["totals"]["refused"] == 1

    def local_rows() -> list[dict[str, Any]]:
        j = hapax("usage", "-c", cfg, "--key", "ana", "--by", "key,model", "--format", "json")
        assert j.returncode == 0, j.stderr
        return list(orjson.loads(j.stdout)["data"])

    deadline = time.monotonic() + 10
    while not (rows := local_rows()) or rows[0]["refused"] < 1:
        assert time.monotonic() < deadline, rows
    assert rows == [{"key": key_id, "model": "demo", "key_name": "ana", "requests": 2, "refused": 1,
                     "errors": 0, "prompt_tokens": rows[0]["prompt_tokens"],
                     "completion_tokens": rows[0]["completion_tokens"], "cached_tokens": 0,
                     "total_tokens": rows[0]["total_tokens"], "cost_usd": rows[0]["cost_usd"]}]
    assert rows[0]["total_tokens"] > 0

    table = hapax("usage", "-c", cfg, "--by", "team")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TEAM", "REQUESTS", "REFUSED", "ERRORS", "TOKENS", "COST_USD"], lines
    assert lines[1].split()[:3] == ["alpha", "2", "1"] and lines[-1].startswith("TOTAL")

    csv = hapax("usage", "--url", gw.url, "--by", "day,key", "--format", "csv", env=ENV).stdout.splitlines()
    assert csv[0] == ("day,key,requests,refused,errors,prompt_tokens,completion_tokens,cached_tokens,"
                      "total_tokens,cost_usd,key_name")
    assert csv[1].split(",")[1:4] == [key_id, "2", "1"] and csv[1].endswith(",ana")

    # The refusal survives a restart with the rest of the ledger.
    gw.stop()
    gw.start()
    assert admin(gw, "GET", "/admin/usage?key=ana").json()["totals"]["refused"] == 1
    assert admin(gw, "GET", "/admin/usage?group_by=colour").status_code == 400


def test_serve_refuses_a_bad_redis_url_or_cluster_name_in_one_line() -> None:
    r = hapax("serve", "--redis", "http://127.0.0.1:6379")
    _one_line_error(r, "--redis / HAPAX_REDIS_URL: must start with redis://, rediss:// or unix://")
    r = hapax("serve", env={"HAPAX_CLUSTER": "two words"})
    _one_line_error(r, "--cluster / HAPAX_CLUSTER")
