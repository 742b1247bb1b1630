"""The etcd key layout of a cluster (docs/cluster.md, "Key layout in etcd"), and the member record."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson


def root(cluster: str) -> bytes:
    return f"/hapax/{cluster}/".encode()


def config_key(cluster: str) -> bytes:
    return root(cluster) + b"config"


def nodes_prefix(cluster: str) -> bytes:
    return root(cluster) + b"nodes/"


def leader_key(cluster: str) -> bytes:
    return root(cluster) + b"leader"


def keys_prefix(cluster: str) -> bytes:
    """API key records, one per ``<key_id>``; ends in ``/`` so no other cluster shares the range."""
    return root(cluster) + b"keys/"


def reload_key(cluster: str) -> bytes:
    """Bumped by ``hapax cluster reload``; every node watches it."""
    return root(cluster) + b"reload"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node says about itself under ``/hapax/<cluster>/nodes/<id>`` (JSON)."""

    id: str
    #: ``host:port`` its peers and operators reach it at (``cluster.advertise_address``).
    address: str
    version: str
    #: Unix seconds.
    started_at: float
    #: The config revision it runs (0: its bootstrap file; else the etcd revision of the config key).
    config_revision: int
    in_flight: int

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> NodeRecord | None:
        """``None`` for a record this version cannot read (a newer node's, a hand-written one)."""
        try:
            d: dict[str, Any] = orjson.loads(raw)
            return cls(id=str(d["id"]), address=str(d["address"]), version=str(d["version"]),
                       started_at=float(d["started_at"]), config_revision=int(d["config_revision"]),
                       in_flight=int(d["in_flight"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
