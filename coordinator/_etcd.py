"""One aetcd client per node, built from ``cluster.etcd``."""

from __future__ import annotations

from urllib.parse import urlsplit

import aetcd

from hapax.config import EtcdConfig


def connect(cfg: EtcdConfig) -> aetcd.Client:
    """A client for the first endpoint; the caller awaits ``connect()`` with a timeout.

    aetcd's calls take the config's timeout, so no etcd call can hang a node.
    """
    if not cfg.endpoints:
        raise ValueError("cluster.etcd.endpoints is empty")
    url = urlsplit(cfg.endpoints[0])
    return aetcd.Client(
        host=url.hostname or "127.0.0.1", port=url.port or 2379,
        username=cfg.username, password=cfg.password.get_secret_value() if cfg.password else None,
        timeout=cfg.timeout,  # aetcd annotates int, but grpc takes float seconds
    )
