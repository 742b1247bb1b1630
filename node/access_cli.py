"""``hapax keys ...``, ``hapax usage`` and ``hapax audit verify``.

A key is named by its id or by its name (unique among active keys).

Key commands work in one of two ways, chosen per call:

- local (default): on the key store in the state directory (``--state-dir``,
  or ``auth.state_dir`` of ``--config``), in Redis when the config sets
  ``state.redis.url``, or in etcd with ``--etcd`` (``HAPAX_ETCD_ENDPOINTS``,
  ``cluster.etcd``) and ``--cluster`` (``HAPAX_CLUSTER``, ``state.cluster``),
  when no ``--state-dir`` is given. Every node of a cluster sees an etcd write
  within milliseconds. It needs no running node and no
  admin key, only file access to the state directory, so it is how the first
  keys are made. A running node sees the change on its next request. The
  config is read without its secrets: a value whose environment variable is
  unset (``admin_key: ${HAPAX_ADMIN_KEY}``) is left out rather than an error.
- remote (``--url``): through a node's admin API with an admin key
  (``--admin-key`` or ``HAPAX_ADMIN_KEY``). Use this for a node on another
  machine, or a cluster.

Both go through the same handlers as the admin API, so validation and audit
events are identical; a local command is audited with actor ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aetcd
import orjson
from pydantic import ValidationError

from coordinator import EtcdKeyStore
from hapax import ConfigError, Exchange, HapaxError, Request, Response
from hapax.access import AccessControl, KeyRecord, Principal, verify
from hapax.config import Config

from .etcd_cli import cli_config, etcd_flags

_SECRET_NOTE = "The key is shown only once; store it now."


def add_parsers(sub: Any) -> None:
    k = sub.add_parser("keys", help="manage API keys (local store, or a node's admin API with --url)")
    ksub = k.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, help="config file whose auth.state_dir holds the keys")
        p.add_argument("--state-dir", type=Path, help="state directory (overrides --config)")
        p.add_argument("--url", help="a node's base URL: go through its admin API instead")
        p.add_argument("--admin-key", help="admin key for --url (default: $HAPAX_ADMIN_KEY)")
        etcd_flags(p)
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
        p.add_argument("key_id", metavar="KEY", help="the key's id or its name")
    ksub.add_parser("generate", help="print a random secret, e.g. for auth.admin_key")
    ex = ksub.add_parser("export", help="print every key record (hashes, never secrets) as keys.json does")
    common(ex)
    im = ksub.add_parser("import", help="add the key records of a keys.json (or an export) to the store")
    common(im)
    im.add_argument("file", type=Path, help="a keys.json from a state directory, or hapax keys export's output")

    u = sub.add_parser("usage", help="usage by key, team, model and day (local store, or --url)")
    u.add_argument("--config", "-c", type=Path, help="config file whose auth.state_dir holds the usage")
    u.add_argument("--state-dir", type=Path, help="state directory (overrides --config)")
    u.add_argument("--url", help="a node's base URL: go through its admin API instead")
    u.add_argument("--admin-key", help="admin key for --url (default: $HAPAX_ADMIN_KEY)")
    u.add_argument("--key", help="one key, by id or name")
    u.add_argument("--team")
    u.add_argument("--model", help="public model name")
    u.add_argument("--from", dest="since", metavar="YYYY-MM-DD", help="first day (UTC), inclusive")
    u.add_argument("--to", dest="until", metavar="YYYY-MM-DD", help="last day (UTC), inclusive")
    u.add_argument("--by", default="day,key,team,model",
                   help="comma-separated: what rows are per, of day,key,team,model,deployment "
                   "(default: day,key,team,model)")
    u.add_argument("--format", choices=("table", "json", "csv"), default="table")

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain of an audit file or directory")
    v.add_argument("path", type=Path)


def run(args: argparse.Namespace) -> int:
    """Errors raise (``ConfigError`` and the like); ``hapax``'s main prints them as one line."""
    if args.command == "audit":
        return _verify(args.path)
    if args.command == "usage":
        return _usage(args)
    if args.keys_command == "generate":
        print("hpx_admin_" + secrets.token_urlsafe(32))
        return 0
    if args.keys_command in ("export", "import"):
        return _move(args)
    method, path, body, query = _request(args)
    status, out = _call(args, method, path, body, query)
    if status >= 400:
        return _failed(out)
    _print(args, out)
    return 0


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str]
) -> tuple[int, Any]:
    if args.url:
        return _remote(args, method, path, body, query)
    return _local(args, method, path, body, query)


def _failed(out: Any) -> int:
    err = out.get("error", {}) if isinstance(out, dict) else {}
    message = err.get("message", out) if isinstance(err, dict) else err
    print(f"error: {message}", file=sys.stderr)
    return 1


def _usage(args: argparse.Namespace) -> int:
    q = {k: v for k, v in (("key", args.key), ("team", args.team), ("model", args.model),
                           ("from", args.since), ("to", args.until)) if v}
    q["group_by"] = args.by
    if args.format == "csv":
        q["format"] = "csv"
    status, out = _call(args, "GET", "/admin/usage", None, q)
    if status >= 400:
        return _failed(out)
    if args.format == "csv":
        sys.stdout.write(out)
    elif args.format == "json":
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _usage_table(out["data"], out["totals"], [d.strip() for d in args.by.split(",") if d.strip()])
    return 0


def _usage_table(rows: list[dict[str, Any]], totals: dict[str, Any], by: list[str]) -> None:
    def cell(r: dict[str, Any], d: str) -> str:
        v = str(r[d] or "-")
        return f"{r['key_name']} ({v})" if d == "key" and r.get("key_name") else v

    table = [[d.upper() for d in by] + ["REQUESTS", "REFUSED", "ERRORS", "TOKENS", "COST_USD"]]
    total_dims = ["TOTAL", *[""] * (len(by) - 1)] if by else []
    for r, dims in [*((r, [cell(r, d) for d in by]) for r in rows), (totals, total_dims)]:
        nums = (r["requests"], r["refused"], r["errors"], r["total_tokens"])
        table.append([*dims, *(str(n) for n in nums), f"{r['cost_usd']:.6f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        # Dimensions to the left, numbers to the right, as a spreadsheet shows them.
        print("  ".join(c.ljust(w) if i < len(by) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


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
    ref = args.key_id
    if cmd == "show":
        return "GET", f"/admin/keys/{ref}", None, {}
    if cmd == "revoke":
        return "POST", f"/admin/keys/{ref}/revoke", None, {}
    return "POST", f"/admin/keys/{ref}/rotate", None, {}


def _local(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str]
) -> tuple[int, Any]:
    from hapax.access import ADMIN_ROUTES

    cfg = cli_config(args)
    ac, etcd = _store(args, cfg)
    ac.check_models = args.config is not None
    req = Request(method, path, {}, orjson.dumps(body) if body is not None else b"", "local", query)
    ex = Exchange("cli_" + secrets.token_hex(8), "admin", method, path, "local")
    who = Principal(id=f"cli:{getpass.getuser()}", role="admin", name="hapax CLI on the state directory")

    async def call(fn: Any, ref: str) -> Response:
        try:
            if isinstance(ac.keys, EtcdKeyStore):
                await ac.keys.load()  # no keys read, no answer: a 404 would be a lie
            await ac.start()  # loads a shared (Redis) store; nothing to do for the file store
            resp: Response = await fn(ac, req, ex, who, ref)
            return resp
        finally:
            ac.flush()
            await ac.aclose()
            if etcd is not None:
                await etcd.close()

    for m, rx, _perm, fn in ADMIN_ROUTES:
        match = rx.match(path)
        if m == method and match is not None:
            try:
                resp = asyncio.run(call(fn, match.group(1) if match.groups() else ""))
            except HapaxError as exc:
                return exc.status, {"error": {"message": exc.message, "code": exc.code}}
            if resp.headers.get("content-type", "").startswith("text/csv"):
                return resp.status, resp.body.decode()
            return resp.status, orjson.loads(resp.body)
    raise ConfigError(f"no such command: {method} {path}")


def _store(args: argparse.Namespace, cfg: Config) -> tuple[AccessControl, aetcd.Client | None]:
    """The access control a local command works on: the state directory's, Redis's or etcd's keys."""
    from coordinator import connect

    from .server import shared_stores, state_dir

    sdir = args.state_dir or state_dir(cfg, args.config)
    etcd = connect(cfg.cluster.etcd) if cfg.cluster.etcd.endpoints and args.state_dir is None else None
    keys, usage = shared_stores(cfg, etcd=etcd) if args.state_dir is None else (None, None)
    if sdir is None and keys is None:
        raise ConfigError("no state directory: pass --state-dir, --etcd, or --config with auth.state_dir, "
                          "state.redis.url or cluster.etcd.endpoints set")
    ac = AccessControl(cfg, state_dir=sdir, announce=False, keys=keys, usage=usage)
    return ac, etcd


def _move(args: argparse.Namespace) -> int:
    """``export``: every record of the store, as ``keys.json`` holds them (hashes, no secrets).
    ``import``: add such records to the store; an id it has already is left as it is there."""
    if args.url:
        raise ConfigError(f"keys {args.keys_command} works on a store (--state-dir, --config, --etcd), "
                          "not through --url")
    cfg = cli_config(args)
    ac, etcd = _store(args, cfg)
    records: list[KeyRecord] = []
    if args.keys_command == "import":
        try:
            doc = orjson.loads(args.file.read_bytes())
            records = [KeyRecord.model_validate(r) for r in doc["keys"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
            raise ConfigError(f"{args.file} is not a keys.json or a hapax keys export "
                              f"({type(exc).__name__})") from None

    async def go() -> list[str]:
        try:
            if isinstance(ac.keys, EtcdKeyStore):
                await ac.keys.load()
            await ac.start()
            if args.keys_command == "export":
                await ac.keys.refreshed()
                out = {"version": 1, "keys": [r.model_dump(mode="json") for r in ac.keys.all()]}
                sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
                return []
            added = []
            for rec in records:
                if ac.keys.get(rec.id) is None:
                    await ac.keys.save(rec)
                    ac.audit.record("key.imported", actor=f"cli:{getpass.getuser()}", target=rec.id,
                                    details={"name": rec.name, "from": str(args.file)})
                    added.append(rec.id)
            return added
        finally:
            ac.flush()
            await ac.aclose()
            if etcd is not None:
                await etcd.close()

    try:
        added = asyncio.run(go())
    except HapaxError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.keys_command == "import":
        print(f"imported {len(added)} key(s); {len(records) - len(added)} already there, left as they are",
              file=sys.stderr)
    return 0


def _remote(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, query: dict[str, str]
) -> tuple[int, Any]:
    key = args.admin_key or os.environ.get("HAPAX_ADMIN_KEY")
    if not key:
        raise ConfigError("--url needs an admin key: --admin-key or $HAPAX_ADMIN_KEY")
    # A key named by its name may hold anything a URL path cannot.
    url = args.url.rstrip("/") + quote(path)
    if query:
        from urllib.parse import urlencode

        url += "?" + urlencode(query)
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            if resp.headers.get("content-type", "").startswith("text/csv"):
                return resp.status, raw.decode()
            return resp.status, _json_or_text(raw)
    except urllib.error.HTTPError as exc:
        return exc.code, _json_or_text(exc.read() or b"{}")
    except urllib.error.URLError as exc:
        raise ConfigError(f"cannot reach {args.url}: {exc.reason}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise ConfigError(f"cannot reach {args.url}: {exc}") from None
    except ValueError as exc:  # a malformed --url
        raise ConfigError(f"bad --url {args.url!r}: {exc}") from None


def _json_or_text(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"error": {"message": f"not a Hapax answer: {raw[:200].decode(errors='replace')!r}"}}


def _print(args: argparse.Namespace, out: Any) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if args.keys_command == "list":
        rows = out["data"]
        print(f"{'ID':<22} {'NAME':<20} {'TEAM':<12} {'ROLE':<10} {'HINT':<14} {'CREATED':<20} "
              f"{'LAST USED':<20} STATUS")
        for r in rows:
            status = "revoked" if r["revoked"] else "active"
            print(f"{r['id']:<22} {r['name'][:20]:<20} {(r['team'] or '-')[:12]:<12} {r['role']:<10} "
                  f"{r['hint']:<14} {r['created_at'] or '-':<20} {r['last_used_at'] or '-':<20} {status}")
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
