"""Roles and what each may do: the permission matrix, in one table.

Theory of operation: a key carries one role; a role is a fixed set of
permissions. Every admin route names the one permission it needs
(``hapax.access._admin``), model calls need ``CALL_MODELS``, and the operators'
health view ``GET /v1/health/providers`` needs ``VIEW_CLUSTER`` when keys
are on (``AccessControl.authorize``). The table below is
the whole policy; docs/security.md prints the same matrix and a test walks it
through HTTP.

Only ``admin`` manages keys, so no other role can mint a key more powerful
than itself.
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    CALL_MODELS = "call_models"
    READ_USAGE = "read_usage"
    MANAGE_KEYS = "manage_keys"
    MANAGE_CONFIG = "manage_config"
    VIEW_CLUSTER = "view_cluster"


P = Permission

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    #                call models     read usage    manage keys    manage config    view cluster
    "admin": frozenset({P.CALL_MODELS, P.READ_USAGE, P.MANAGE_KEYS, P.MANAGE_CONFIG, P.VIEW_CLUSTER}),
    "operator": frozenset({P.CALL_MODELS, P.READ_USAGE, P.MANAGE_CONFIG, P.VIEW_CLUSTER}),
    "developer": frozenset({P.CALL_MODELS}),
    "viewer": frozenset({P.READ_USAGE, P.VIEW_CLUSTER}),
}

ROLES = tuple(ROLE_PERMISSIONS)


def allowed(role: str, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS.get(role, frozenset())
