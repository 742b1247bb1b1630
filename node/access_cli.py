"""``hapax keys ...`` and ``hapax audit verify``.

Key commands work in one of two ways, chosen per call:

- local (default): on the key store in the state directory (``--state-dir``,
  or ``auth.state_dir`` of ``--config``). It needs no running node and no
  admin key, only file access to the state directory, so it is how the first
  keys are made. A running node sees the change on its next request.
- remote (``--url``): through a node's admin API with an admin key
  (``--admin-key`` or ``HAPAX_ADMIN_KEY``). Use this for a node on another
  machine, or a cluster.

Both go through the same handlers as the admin API, so validation and audit
events are identical; a local command is audited with actor ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from hapax import ConfigError, default_config, load_config
from hapax._access import AccessControl, Principal
from hapax._audit import verify
from hapax._exchange import Exchange
from hapax._http import Request

_SECRET_NOTE = "The key is shown only once; store it now."


def add_parsers(sub: Any) -> None:
    k = sub.add_parser("keys", help="manage API keys (local store, or a node's admin API with --url)")
    ksub = k.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, help="config file whose auth.state_dir holds the keys")
        p.add_argument("--state-dir", type=Path, help="state directory (overrides --config)")
        p.add_argument("--url", help="a node's base URL: go through its admin API instead")
        p.add_argument("--admin-key", help="admin key for --url (default: $HAPAX_ADMIN_KEY)")
        p.add_argument("--json", action="store_true", help="print JSON")

    c = ksub.add_parser("create", help="mint a key; prints the secret once")
    common(c)
    c.add_argument("--name", required=True)
    c.add_argument("--owner", default="")
    c.add_argument("--team")
    c.add_argument("--role", default="developer", choices=["admin", "operator", "developer", "viewer"])
    c.add_argument("--models", help="comma-separated allowlist of public model names")
    c.add_argument("--rpm", type=int, help="requests per minute")
    c.add_argument("--tpm", type=int, help="tokens per minute")
    c.add_argument("--concurrent", type=int, help="requests in flight")
    c.add_argument("--daily-usd", type=float)
    c.add_argument("--monthly-usd", type=float)
    c.add_argument("--daily-tokens", type=int)
    c.add_argument("--monthly-tokens", type=int)
    c.add_argument("--expires-in-days", type=float)
    lst = ksub.add_parser("list", help="list keys")
    common(lst)
    lst.add_argument("--team")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    for name, helptext in (("show", "show one key"), ("revoke", "revoke a key now"),
                           ("rotate", "replace a key's secret; prints the new one once")):
        p = ksub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("key_id")
    ksub.add_parser("generate", help="print a random secret, e.g. for auth.admin_key")

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain of an audit file or directory")
    v.add_argument("path", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.command == "audit":
        return _verify(args.path)
    if args.keys_command == "generate":
        print("hpx_admin_" + secrets.token_urlsafe(32))
        return 0
    method, path, body, query = _request(args)
    try:
        if args.url:
            status, out = _remote(args, method, path, body, query)
        else:
            status, out = _local(args, method, path, body, query)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        err = out.get("error", {}) if isinstance(out, dict) else {}
        print(f"error: {err.get('message', out)}", file=sys.stderr)
        return 1
    _print(args, out)
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None, dict[str, str]]:
    cmd = args.keys_command
    if cmd == "create":
        limits = {k: v for k, v in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm),
                                    ("concurrent", args.concurrent)) if v is not None}
        budget = {k: v for k, v in (("daily_usd", args.daily_usd), ("monthly_usd", args.monthly_usd),
                                    ("daily_tokens", args.daily_tokens),
                                    ("monthly_tokens", args.monthly_tokens)) if v is not None}
        body: dict[str, Any] = {"name": args.name, "owner": args.owner, "role": args.role,
                                "limits": limits, "budget": budget}
        if args.team:
            body["team"] = args.team
        if args.models:
            body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.expires_in_days:
            body["expires_in_days"] = args.expires_in_days
        return "POST", "/admin/keys", body, {}
    if cmd == "list":
        q = {"include_revoked": "true"} if args.all else {}
        if args.team:
            q["team"] = args.team
        return "GET", "/admin/keys", None, q
    if cmd == "show":
        return "GET", f"/admin/keys/{args.key_id}", None, {}
    if cmd == "revoke":
        return "POST", f"/admin/keys/{args.key_id}/revoke", None, {}
    return "POST", f"/admin/keys/{args.key_id}/rotate", None, {}


def _local(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str]
) -> tuple[int, Any]:
    from hapax import _admin

    from .server import state_dir

    cfg = load_config(args.config) if args.config else default_config()
    sdir = args.state_dir or state_dir(cfg, args.config)
    if sdir is None:
        raise ConfigError("no state directory: pass --state-dir, or --config with auth.state_dir set")
    ac = AccessControl(cfg, state_dir=sdir, announce=False)
    ac.check_models = args.config is not None
    req = Request(method, path, {}, orjson.dumps(body) if body is not None else b"", "local", query)
    ex = Exchange("cli_" + secrets.token_hex(8), "admin", method, path, "local")
    who = Principal(id=f"cli:{getpass.getuser()}", role="admin", name="hapax CLI on the state directory")
    from hapax._errors import HapaxError

    for m, rx, _perm, fn in _admin._COMPILED:
        match = rx.match(path)
        if m == method and match is not None:
            try:
                resp = fn(ac, req, ex, who, match.group(1) if match.groups() else "")
            except HapaxError as exc:
                return exc.status, {"error": {"message": exc.message, "code": exc.code}}
            finally:
                ac.flush()
            return resp.status, orjson.loads(resp.body)
    raise AssertionError(f"no admin route for {method} {path}")


def _remote(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str]
) -> tuple[int, Any]:
    key = args.admin_key or os.environ.get("HAPAX_ADMIN_KEY")
    if not key:
        raise ConfigError("--url needs an admin key: --admin-key or $HAPAX_ADMIN_KEY")
    url = args.url.rstrip("/") + path
    if query:
        from urllib.parse import urlencode

        url += "?" + urlencode(query)
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")
    except urllib.error.URLError as exc:
        raise ConfigError(f"cannot reach {args.url}: {exc.reason}") from None


def _print(args: argparse.Namespace, out: Any) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if args.keys_command == "list":
        rows = out["data"]
        print(f"{'ID':<22} {'NAME':<20} {'TEAM':<12} {'ROLE':<10} {'HINT':<14} STATUS")
        for r in rows:
            status = "revoked" if r["revoked"] else "active"
            print(f"{r['id']:<22} {r['name'][:20]:<20} {(r['team'] or '-')[:12]:<12} {r['role']:<10} "
                  f"{r['hint']:<14} {status}")
        return
    if "key" in out:
        print(out["key"])
        print(f"id: {out['id']}  name: {out['name']}  role: {out['role']}  team: {out['team'] or '-'}",
              file=sys.stderr)
        print(_SECRET_NOTE, file=sys.stderr)
        return
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")


def _verify(path: Path) -> int:
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 1
    res = verify(path)
    for problem in res.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if res.starts_at_seq is not None:
        print(f"note: the chain starts at event {res.starts_at_seq} (older files removed by retention)")
    if res.ok:
        print(f"ok: {res.events} events in {len(res.files)} file(s), chain intact")
        return 0
    print(f"tampered: {len(res.problems)} problem(s) in {res.events} events", file=sys.stderr)
    return 1
