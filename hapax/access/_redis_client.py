"""One way to open a Redis client from ``state.redis``, for every shared store.

redis-py retries a failed command three times by default, with backoff: a dead
Redis would then cost several timeouts per call. Hapax bounds each call itself
(``asyncio.timeout(cfg.timeout)``) and treats a failure as Redis being down, so the
client is made with no retries of its own.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import RedisConfig

#: What a Redis call can fail with: the client's errors, a socket's, or our own timeout.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


def prefix(cfg: RedisConfig, cluster: str) -> str:
    """``{key_prefix}:{cluster}``: every key a cluster writes starts with it."""
    return f"{cfg.key_prefix}:{cluster}"


def connect(cfg: RedisConfig, *, blocking_reads: bool = False) -> Redis:
    """A client for ``cfg``; ``blocking_reads`` for a pub/sub connection that waits for messages.

    The socket timeout bounds a command that never gets an answer; a subscriber's socket
    is idle between messages by design, so it has none (its reads carry their own timeout).
    """
    if cfg.url is None:
        raise RuntimeError("state.redis.url is unset: there is no Redis to connect to")
    kw: dict[str, Any] = {
        "socket_connect_timeout": cfg.timeout,
        "socket_timeout": None if blocking_reads else cfg.timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 10 if blocking_reads else 0,
    }
    if cfg.password is not None:
        kw["password"] = cfg.password.get_secret_value()
    if cfg.tls_ca_file is not None and cfg.url.startswith("rediss://"):
        kw["ssl_ca_certs"] = cfg.tls_ca_file
    return Redis.from_url(cfg.url, **kw)
