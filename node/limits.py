"""File descriptors: take the whole allowance at start-up, fit the connection cap in it, watch it.

Every client connection, upstream connection and open file is a descriptor. When
they run out, ``accept()`` fails and the kernel resets new connections (health
probes included) with nothing in the log. So the node raises its soft
``RLIMIT_NOFILE`` to the hard limit, keeps ``server.max_connections`` below
what is left after a reserve for upstream pools and files, and warns when the
process nears the limit anyway.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from hapax import Config

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows, which Hapax does not run on
    resource = None  # type: ignore[assignment]

log = logging.getLogger("hapax.node")

#: Descriptors kept back from client connections besides the upstream pools: log and
#: state files, the event loop's own, a config reload's new pools before the old close.
RESERVED_FDS: Final = 64
#: Warn once the process uses this share of its descriptor limit.
WARN_RATIO: Final = 0.8


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit in force."""
    if resource is None:  # pragma: no cover
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # setting the soft limit to "infinity" fails on Linux (nr_open)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(soft if soft != resource.RLIM_INFINITY else hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the file-descriptor limit", extra={"fields": {"soft": soft, "error": str(exc)}})
        return int(soft)
    log.info("raised the file-descriptor limit", extra={"fields": {"from": soft, "to": hard}})
    return int(hard)


def nofile() -> int:
    if resource is None:  # pragma: no cover
        return 1 << 20
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(config: Config) -> int:
    """``server.max_connections``, or fewer if the descriptor limit cannot hold that many."""
    limit = nofile()
    # Pools rarely fill, and many providers must not leave no room for clients: at most half.
    reserve = min(RESERVED_FDS + sum(p.pool_size for p in config.providers.values()), limit // 2)
    return max(1, min(config.server.max_connections, limit - reserve))


def open_fds() -> int | None:
    """Descriptors open in this process, where the OS tells cheaply (Linux)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def check(config: Config) -> None:
    """Warn when the process nears its descriptor limit (called every few seconds)."""
    used = open_fds()
    limit = nofile()
    if used is not None and used >= limit * WARN_RATIO:
        log.warning(
            "open file descriptors near the limit; new connections will be refused",
            extra={"fields": {"open_fds": used, "limit": limit, "max_connections": connection_cap(config)}},
        )
