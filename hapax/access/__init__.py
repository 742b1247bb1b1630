"""Access control: who is calling (keys, roles), what they may spend (limits, budgets, prices),
what they spent (usage, the usage ledger, settlement), the audit trail and the admin API."""

from __future__ import annotations

from ._admin import _COMPILED as ADMIN_ROUTES
from ._audit import verify
from ._control import AccessControl
from ._grant import AccessGrant
from ._keys import KeyRecord, KeyStore, MemoryKeyStore
from ._keys_redis import RedisKeyStore
from ._principal import Principal
from ._roles import Permission
from ._usage_redis import RedisUsage

__all__ = [
    "ADMIN_ROUTES", "AccessControl", "AccessGrant", "KeyRecord", "KeyStore", "MemoryKeyStore", "Permission",
    "Principal", "RedisKeyStore", "RedisUsage", "verify",
]
