"""One aetcd client per node, built from ``cluster.etcd``."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

import aetcd

from hapax.config import EtcdConfig

#: gRPC channel options. grpc's own reconnect backoff grows to 120 s, which would keep a
#: node off etcd long after etcd is back: cap it near the watch's. Keep-alive pings find a
#: dead peer on an idle stream (etcd refuses pings closer than 5 s: --grpc-keepalive-min-time).
CHANNEL_OPTIONS: Final[dict[str, Any]] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
}


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
        options=CHANNEL_OPTIONS,
    )
