"""``hapax cluster status``: the cluster's members, leader and config revisions.

Two ways to look: ``--etcd``/``--cluster`` (``node.etcd_cli``) read the member
records, the leader key and the config key from etcd itself; ``--url`` asks any
node for ``GET /admin/cluster`` (with ``--admin-key`` or ``$HAPAX_ADMIN_KEY``
when keys are on). Both print the same document (``--json``) or a table.

The exit status is for scripts and probes: 0 when every node runs the same
config revision, 1 when they still disagree after ``--settle`` seconds (a push
takes milliseconds to land everywhere, so a disagreement that outlasts a few
seconds is a node that cannot apply it), 1 also when the cluster cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Final

import orjson

from coordinator import connect, read_status
from hapax import ConfigError

from .etcd_cli import cli_config, etcd_flags

#: Seconds nodes may disagree on the config revision before ``status`` exits non-zero.
SETTLE_S: Final = 5.0
#: Seconds between looks while they disagree.
LOOK_EVERY_S: Final = 0.25


def add_parser(csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``status`` under the ``hapax cluster`` parser (``reload`` is ``node.reload_cli``'s)."""
    s = csub.add_parser("status", help="members, leader, config revisions; exit 1 when the nodes disagree")
    s.add_argument("--config", "-c", help="a node's config file, for cluster.etcd (TLS, user)")
    etcd_flags(s)
    s.add_argument("--url", help="ask this node (GET /admin/cluster) instead of etcd")
    s.add_argument("--admin-key", help="a key with 'view cluster' for --url (default: $HAPAX_ADMIN_KEY)")
    s.add_argument("--json", action="store_true", help="print the status document as JSON")
    s.add_argument("--settle", type=float, default=SETTLE_S, metavar="SECONDS",
                   help=f"how long nodes may disagree on the config revision (default {SETTLE_S:g})")


def run(args: argparse.Namespace) -> int:
    if args.cluster_command != "status":
        raise ConfigError(f"no such command: cluster {args.cluster_command}")
    return status(args)


def status(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + max(0.0, args.settle)
    while True:
        doc = _from_url(args) if args.url else asyncio.run(_from_etcd(args))
        if agree(doc) or time.monotonic() >= deadline:
            break
        time.sleep(LOOK_EVERY_S)  # a CLI, not the event loop: a bounded wait between looks
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n" if args.json else table(doc))
    if not agree(doc):
        revs = sorted({n["config_revision"] for n in doc["nodes"]})
        print(f"error: the nodes disagree on the config revision ({', '.join(map(str, revs))}) "
              f"for more than {args.settle:g} s", file=sys.stderr)
        return 1
    return 0


def agree(doc: dict[str, Any]) -> bool:
    return len({n["config_revision"] for n in doc["nodes"]}) <= 1


async def _from_etcd(args: argparse.Namespace) -> dict[str, Any]:
    cfg = cli_config(args)
    etcd = cfg.cluster.etcd
    if not etcd.endpoints:
        raise ConfigError("no etcd: --etcd, $HAPAX_ETCD_ENDPOINTS or cluster.etcd.endpoints in --config")
    client = connect(etcd)
    try:
        return await read_status(client, cfg.state.cluster, timeout=etcd.timeout)
    except Exception as exc:
        raise ConfigError(f"cannot read the cluster from etcd ({', '.join(etcd.endpoints)}): "
                          f"{type(exc).__name__}") from None
    finally:
        with contextlib.suppress(Exception):  # closing a channel that never opened: nothing to do
            await asyncio.wait_for(client.close(), etcd.timeout)


def _from_url(args: argparse.Namespace) -> dict[str, Any]:
    key = args.admin_key or os.environ.get("HAPAX_ADMIN_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/") + "/admin/cluster"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            doc: dict[str, Any] = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"{url}: HTTP {exc.code}: {_message(exc.read())}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ConfigError(f"cannot reach {args.url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"bad --url {args.url!r} or answer: {exc}") from None
    if "nodes" not in doc:
        raise ConfigError(f"{url} did not answer with a cluster status")
    return doc


def _message(raw: bytes) -> str:
    try:
        return str(orjson.loads(raw)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def table(doc: dict[str, Any]) -> str:
    deps = doc.get("dependencies", {})
    lines = [f"cluster {doc.get('cluster')}  leader {doc.get('leader') or '(none)'}  "
             f"config revision {doc.get('revision')}  "
             + "  ".join(f"{k} {v}" for k, v in deps.items())]
    rows = [("NODE", "ADDRESS", "VERSION", "REVISION", "LEADER", "STARTED", "IN FLIGHT")]
    rows += [(n["id"], n["address"], n["version"], str(n["config_revision"]), "*" if n["leader"] else "",
              n["started_at"], str(n["in_flight"])) for n in doc["nodes"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"
