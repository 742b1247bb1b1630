"""``hapax cluster reload``: ask every node of a cluster to re-read what is mounted.

It bumps ``/hapax/<cluster>/reload`` in etcd (``coordinator._reload``); each node
watching it re-reads its providers' ``api_key_file``s and CA bundle and looks at its
config source again, as SIGHUP does on one node. It prints the etcd revision of
the request; each node logs ``reloaded credentials and certificates`` with it and
counts ``hapax_reloads_total{trigger="cluster"}``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from coordinator import connect, request_reload
from hapax import ConfigError

from .etcd_cli import cli_config, etcd_flags


def add_parser(csub: Any) -> None:
    r = csub.add_parser("reload", help="make every node re-read its credential files and certificates")
    r.add_argument("--config", "-c", type=Path, help="config file whose cluster.etcd says how to reach etcd")
    etcd_flags(r)


def run(args: argparse.Namespace) -> int:
    cfg = cli_config(args)
    etcd = cfg.cluster.etcd
    if not etcd.endpoints:
        raise ConfigError("no etcd: pass --etcd URL (or HAPAX_ETCD_ENDPOINTS, or --config with "
                          "cluster.etcd.endpoints)")
    cluster = cfg.state.cluster

    async def go() -> tuple[int, dict[str, Any]]:
        client = connect(etcd)
        try:
            return await request_reload(client, cluster=cluster, timeout=etcd.timeout)
        finally:
            await client.close()

    try:
        revision, record = asyncio.run(go())
    except Exception as exc:  # aetcd's errors, a socket's, the timeout: one line, no traceback
        raise ConfigError(f"etcd at {etcd.endpoints[0]} did not take the reload within cluster.etcd.timeout "
                          f"({etcd.timeout:g} s): {type(exc).__name__}") from None
    print(f"reload {record['id']} requested for cluster {cluster} at etcd revision {revision}; "
          "every node re-reads its credential files and certificates")
    return 0


