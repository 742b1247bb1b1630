"""Cluster mode on etcd: membership, leader election, config and keys by watch.

Imported by ``node`` (the composition root); imports only ``hapax``. Nothing here
is on the request path: a node serves from what the watches last delivered.
"""

from ._etcd import connect
from ._watch import PrefixWatch

__all__ = ["PrefixWatch", "connect"]
