"""Cluster mode on etcd: membership, leader election, config and keys by watch.

Imported by ``node`` (the composition root); imports only ``hapax``. Nothing here
is on the request path: a node serves from what the watches last delivered.
"""

from ._config_source import EtcdConfigSource
from ._config_store import (
    HISTORY_LIMIT,
    ConfigStoreError,
    EtcdUnreachable,
    History,
    NothingPushed,
    Pushed,
    RevisionConflict,
    RevisionUnavailable,
    StoredConfig,
    config_diff,
    config_history,
    current_config,
    get_config,
    push_config,
    rollback_config,
)
from ._coordinator import Coordinator, read_status, status
from ._etcd import connect
from ._keys import config_key, keys_prefix, leader_key, nodes_prefix, reload_key
from ._keys_etcd import EtcdKeyStore
from ._reload import ReloadWatch, request_reload
from ._watch import PrefixWatch

__all__ = [
    "HISTORY_LIMIT",
    "ConfigStoreError",
    "Coordinator",
    "EtcdConfigSource",
    "EtcdKeyStore",
    "EtcdUnreachable",
    "History",
    "NothingPushed",
    "PrefixWatch",
    "Pushed",
    "ReloadWatch",
    "RevisionConflict",
    "RevisionUnavailable",
    "StoredConfig",
    "config_diff",
    "config_history",
    "config_key",
    "connect",
    "current_config",
    "get_config",
    "keys_prefix",
    "leader_key",
    "nodes_prefix",
    "push_config",
    "read_status",
    "reload_key",
    "request_reload",
    "rollback_config",
    "status",
]
