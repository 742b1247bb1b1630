"""``hapax config push FILE|get|diff FILE|history|rollback REV``: a cluster's config in etcd.

The config every node of a cluster runs is the YAML at ``/hapax/<cluster>/config``
(``coordinator.push_config`` and the rest; docs/cluster.md, "Config"). ``push`` and
``rollback`` validate first with ``hapax config validate``'s own check, so an
invalid file is refused with the same ``error: <key path>: <what>`` lines and
nothing is written. Output is for people unless ``--json``; every failure is one
``error:`` line (``node.cli.main``) and a non-zero exit: 1, or 2 for ``diff``,
whose 1 means "they differ", as diff(1)'s does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import aetcd
import orjson

import coordinator
from coordinator import ConfigStoreError, EtcdUnreachable, StoredConfig
from hapax import ConfigError
from hapax.config import EtcdConfig

from .etcd_cli import cli_config, etcd_flags

T = TypeVar("T")

COMMANDS: Final = ("push", "get", "diff", "history", "rollback")

#: diff(1)'s exit for trouble: neither "equal" (0) nor "they differ" (1).
DIFF_TROUBLE: Final = 2


def add_parsers(csub: Any) -> None:
    """The five commands, under ``hapax config``'s subparsers."""
    def command(name: str, help: str, *, json: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = csub.add_parser(name, help=help)
        p.add_argument("--config", "-c", type=Path,
                       help="a node's bootstrap config, for cluster.etcd (TLS, user, timeout) and state.cluster")
        etcd_flags(p)
        if json:
            p.add_argument("--json", action="store_true", help="print JSON, for scripts")
        return p

    p = command("push", "validate FILE as 'config validate' does, then make it the cluster's config")
    p.add_argument("file", type=Path)
    _write_flags(p)
    g = command("get", "print the cluster's config (the YAML as pushed); its revision goes to stderr")
    g.add_argument("--revision", type=int, metavar="REV", help="an earlier revision (see 'config history')")
    d = command("diff", "unified diff of the cluster's config against FILE; exit 0 equal, 1 differ, 2 trouble",
                json=False)
    d.add_argument("file", type=Path)
    h = command("history", "the config's revisions kept by etcd, newest first")
    h.add_argument("--limit", type=int, default=coordinator.HISTORY_LIMIT, metavar="N",
                   help=f"at most N revisions ({coordinator.HISTORY_LIMIT})")
    r = command("rollback", "push the config of revision REV again, as a new revision (validated again)")
    r.add_argument("revision", type=int, metavar="REV")
    _write_flags(r)


def _write_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expect-revision", type=int, metavar="N",
                   help="refuse unless the config is still at revision N (0: nothing pushed yet)")
    p.add_argument("--strict", action="store_true", help="refuse on warnings too, as 'config validate --strict'")


def run(args: argparse.Namespace) -> int:
    if args.config_command != "diff":
        return _run(args)
    try:
        return _run(args)
    except ConfigError as exc:  # diff's 1 means "they differ": trouble is 2, as diff(1)'s
        for path, msg in exc.problems:
            print(f"error: {path}: {msg}" if path else f"error: {msg}", file=sys.stderr)
        return DIFF_TROUBLE


def _run(args: argparse.Namespace) -> int:
    cfg = cli_config(args)
    etcd, cluster = cfg.cluster.etcd, cfg.state.cluster
    if not etcd.endpoints:
        raise ConfigError("no etcd: pass --etcd URL (or HAPAX_ETCD_ENDPOINTS, or --config with "
                          "cluster.etcd.endpoints)")
    try:
        return _COMMANDS[args.config_command](args, etcd, cluster)
    except ConfigStoreError as exc:
        where = f"etcd at {','.join(etcd.endpoints)}: " if isinstance(exc, EtcdUnreachable) else ""
        raise ConfigError(where + exc.message) from None


def _with_client(etcd: EtcdConfig, work: Callable[[aetcd.Client], Awaitable[T]]) -> T:
    async def go() -> T:
        client = coordinator.connect(etcd)
        try:
            return await work(client)
        finally:
            await asyncio.wait_for(client.close(), etcd.timeout)
    return asyncio.run(go())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _push(args: argparse.Namespace, etcd: EtcdConfig, cluster: str) -> int:
    from .cli import checked_config

    raw = _read(args.file)
    if checked_config(args.file, strict=args.strict, raw=raw) is None:
        print(f"error: {args.file} refused: nothing pushed", file=sys.stderr)
        return 1
    done = _with_client(etcd, lambda c: coordinator.push_config(
        c, cluster, raw, timeout=etcd.timeout, expect=args.expect_revision))
    return _report(args, cluster, done)


def _rollback(args: argparse.Namespace, etcd: EtcdConfig, cluster: str) -> int:
    from .cli import checked_config

    def check(old: StoredConfig) -> bool:
        return checked_config(f"revision {old.revision}", strict=args.strict, raw=old.data) is not None

    done = _with_client(etcd, lambda c: coordinator.rollback_config(
        c, cluster, args.revision, timeout=etcd.timeout, check=check, expect=args.expect_revision))
    if done is None:
        print(f"error: revision {args.revision} is not a valid config now: nothing pushed", file=sys.stderr)
        return 1
    return _report(args, cluster, done, rolled_back=args.revision)


def _report(args: argparse.Namespace, cluster: str, done: coordinator.Pushed, *,
            rolled_back: int | None = None) -> int:
    if args.json:
        out: dict[str, Any] = {"cluster": cluster, "revision": done.revision, "previous": done.previous,
                               "changed": done.changed}
        if rolled_back is not None:
            out["rolled_back_to"] = rolled_back
        _print_json(out)
    elif not done.changed:
        print(f"unchanged: the config of cluster {cluster} is already these bytes (revision {done.revision})")
    else:
        what = f"the config of revision {rolled_back}" if rolled_back is not None else "config"
        print(f"pushed {what} to cluster {cluster}: revision {done.revision} (was {done.previous or 'none'})")
    return 0


def _get(args: argparse.Namespace, etcd: EtcdConfig, cluster: str) -> int:
    stored = _with_client(etcd, lambda c: coordinator.get_config(
        c, cluster, timeout=etcd.timeout, revision=args.revision))
    if args.json:
        _print_json({"cluster": cluster, "revision": stored.revision, "size": len(stored.data),
                     "sha256": stored.digest, "yaml": stored.data.decode("utf-8", "replace")})
        return 0
    # stdout is the bytes as pushed (``get > file`` restores the file); the rest to stderr.
    print(f"# cluster {cluster}, revision {stored.revision}, sha256 {stored.digest}", file=sys.stderr)
    sys.stdout.buffer.write(stored.data)
    sys.stdout.flush()
    return 0


def _diff(args: argparse.Namespace, etcd: EtcdConfig, cluster: str) -> int:
    raw = _read(args.file)
    stored = _with_client(etcd, lambda c: coordinator.current_config(c, cluster, timeout=etcd.timeout))
    lines = coordinator.config_diff(stored, raw, cluster=cluster, name=str(args.file))
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return 1 if lines else 0


def _history(args: argparse.Namespace, etcd: EtcdConfig, cluster: str) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    h = _with_client(etcd, lambda c: coordinator.config_history(
        c, cluster, timeout=etcd.timeout, limit=args.limit))
    if args.json:
        _print_json({"cluster": cluster, "compacted": h.compacted, "truncated": h.truncated, "revisions": [
            {"revision": e.revision, "size": len(e.data), "sha256": e.digest, "current": i == 0}
            for i, e in enumerate(h.entries)]})
        return 0
    if not h.entries:
        print(f"no config pushed to cluster {cluster} yet")
        return 0
    print(f"{'REVISION':>10}  {'BYTES':>8}  SHA256")
    for i, e in enumerate(h.entries):
        print(f"{e.revision:>10}  {len(e.data):>8}  {e.digest[:12]}{'  (current)' if i == 0 else ''}")
    if h.compacted:
        print("(older revisions were compacted away by etcd)")
    elif h.truncated:
        print(f"(older revisions may exist: --limit {args.limit * 2})")
    return 0


def _print_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, EtcdConfig, str], int]]] = {
    "push": _push, "get": _get, "diff": _diff, "history": _history, "rollback": _rollback,
}
