"""The cluster's desired config in etcd, as ``hapax config push|get|diff|history|rollback`` see it.

Theory of operation: the config is one key, ``/hapax/<cluster>/config``, holding
the YAML bytes exactly as pushed (``${VAR}`` references unexpanded: each node
expands its own). Its revision is the key's ``mod_revision``, the number every
node reports as the config it runs. Its history is etcd's own MVCC history of
the key: ``history`` reads the key at ``mod_revision - 1`` (the version in force
just before that one), and again, until etcd has compacted the revision away or
the key did not exist yet. etcd keeps no wall-clock time per revision, so
neither does the history.

Every write is one transaction comparing the key's ``mod_revision`` with the one
the writer read (compare-and-swap): a push that raced another push is refused,
not written over it, and ``expect`` (``--expect-revision``) makes the operator's
own earlier read the one compared. Pushing the bytes already in force writes
nothing. Validation is the caller's (``node/config_cli.py`` runs ``hapax config
validate``'s check; ``rollback`` takes it as ``check``): this module stores
bytes and reads them back.

Every call is bounded by ``timeout`` (``cluster.etcd.timeout``) as its gRPC
deadline, and gRPC's errors become these at one seam (``_call``)::

    ConfigStoreError
    ├── EtcdUnreachable       refused, or no answer within the timeout
    ├── NothingPushed         the key is empty: no config pushed to this cluster yet
    ├── RevisionConflict      the key moved since it was read, or is not at ``expect``
    └── RevisionUnavailable   compacted, in the future, or not a revision of the config
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aetcd
import grpc
from aetcd import rpc

from hapax.config import digest_of

from ._keys import config_key

T = TypeVar("T")

#: How many revisions ``history`` shows unless asked for more: each is one read.
HISTORY_LIMIT: Final = 20


class ConfigStoreError(Exception):
    """An operator's failure, not a client's: the CLI prints ``message`` as its one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EtcdUnreachable(ConfigStoreError):
    pass


class NothingPushed(ConfigStoreError):
    pass


class RevisionConflict(ConfigStoreError):
    pass


class RevisionUnavailable(ConfigStoreError):
    pass


@dataclass(frozen=True, slots=True)
class StoredConfig:
    """One version of the config key."""

    data: bytes
    #: The key's ``mod_revision``: the config's revision.
    revision: int

    @property
    def digest(self) -> str:
        """SHA-256 of the bytes: ``sha256sum`` of the pushed file, and a node's snapshot digest."""
        return digest_of(self.data)


@dataclass(frozen=True, slots=True)
class Pushed:
    #: The config's revision now (the one already in force when nothing changed).
    revision: int
    #: The one it replaced; 0 when nothing had been pushed.
    previous: int
    #: ``False`` when the bytes were those in force: nothing was written.
    changed: bool


@dataclass(frozen=True, slots=True)
class History:
    #: Newest first; empty when nothing was pushed.
    entries: tuple[StoredConfig, ...]
    #: etcd compacted the revisions before the oldest entry away.
    compacted: bool
    #: ``limit`` entries were read and there may be older ones.
    truncated: bool


_COMPACTED: Final = "compacted"
_FUTURE: Final = "future revision"


async def _call(client: aetcd.Client, op: Callable[[], Awaitable[T]], *, timeout: float) -> T:
    """The seam: connect, run one bounded call, and turn gRPC's failures into ours."""
    try:
        await asyncio.wait_for(client.connect(), timeout)
        return await op()
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.OUT_OF_RANGE:  # compacted or future: the caller words it
            raise RevisionUnavailable(details) from exc
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise EtcdUnreachable(f"no answer within {timeout:g} s (cluster.etcd.timeout)") from exc
        if code == grpc.StatusCode.UNAVAILABLE:
            raise EtcdUnreachable(f"unreachable ({_first_line(details)}; "
                                  f"cluster.etcd.timeout {timeout:g} s)") from exc
        raise ConfigStoreError(f"etcd refused the request: {code.name} {_first_line(details)}") from exc
    except TimeoutError as exc:
        raise EtcdUnreachable(f"no answer within {timeout:g} s (cluster.etcd.timeout)") from exc
    except (aetcd.ClientError, OSError) as exc:  # from connect(): authentication, a name, a certificate
        raise EtcdUnreachable(f"connect failed: {type(exc).__name__} {_first_line(str(exc))}") from exc


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"


async def _range(client: aetcd.Client, key: bytes, *, timeout: float, revision: int = 0) -> Any:
    """The key's value at ``revision`` (0: now), as etcd's ``RangeResponse``.

    aetcd's ``get`` cannot read an older revision, so this goes to the KV stub itself.
    """
    async def op() -> Any:
        return await client.kvstub.Range(rpc.RangeRequest(key=key, revision=revision),
                                         timeout=timeout, metadata=client.metadata)
    return await _call(client, op, timeout=timeout)


async def current_config(client: aetcd.Client, cluster: str, *, timeout: float) -> StoredConfig | None:
    """The config in force, or ``None`` when nothing was pushed."""
    resp = await _range(client, config_key(cluster), timeout=timeout)
    return StoredConfig(resp.kvs[0].value, resp.kvs[0].mod_revision) if resp.kvs else None


async def get_config(
    client: aetcd.Client, cluster: str, *, timeout: float, revision: int | None = None
) -> StoredConfig:
    """The config in force, or the one pushed as ``revision``."""
    if revision is None:
        now = await current_config(client, cluster, timeout=timeout)
        if now is None:
            raise NothingPushed(f"no config pushed to cluster {cluster!r} yet "
                                f"(the etcd key {config_key(cluster).decode()} is empty)")
        return now
    if revision < 1:
        raise RevisionUnavailable(f"revision {revision} is not a revision (they start at 1)")
    try:
        resp = await _range(client, config_key(cluster), timeout=timeout, revision=revision)
    except RevisionUnavailable as exc:
        if _COMPACTED in exc.message:
            raise RevisionUnavailable(f"revision {revision} was compacted away by etcd; "
                                      "'hapax config history' lists the revisions it keeps") from None
        if _FUTURE in exc.message:
            raise RevisionUnavailable(f"revision {revision} does not exist yet") from None
        raise
    kv = resp.kvs[0] if resp.kvs else None
    if kv is None:
        raise RevisionUnavailable(f"cluster {cluster!r} had no config at revision {revision}")
    if kv.mod_revision != revision:
        # Another key's revision: the config then was an older push.
        raise RevisionUnavailable(f"revision {revision} is not a revision of the config of cluster "
                                  f"{cluster!r} (the config at that point was revision {kv.mod_revision})")
    return StoredConfig(kv.value, kv.mod_revision)


async def config_history(client: aetcd.Client, cluster: str, *, timeout: float, limit: int = HISTORY_LIMIT) -> History:
    """The stored revisions of the config, newest first, at most ``limit`` of them."""
    key = config_key(cluster)
    now = await current_config(client, cluster, timeout=timeout)
    entries = [] if now is None else [now]
    compacted = False
    while entries and len(entries) < limit and entries[-1].revision > 1:
        try:
            resp = await _range(client, key, timeout=timeout, revision=entries[-1].revision - 1)
        except RevisionUnavailable as exc:
            if _COMPACTED not in exc.message:
                raise
            compacted = True
            break
        if not resp.kvs:  # the first push, or the key was deleted before this version
            break
        entries.append(StoredConfig(resp.kvs[0].value, resp.kvs[0].mod_revision))
    truncated = len(entries) == limit and entries[-1].revision > 1 and not compacted
    return History(tuple(entries), compacted=compacted, truncated=truncated)


async def push_config(client: aetcd.Client, cluster: str, data: bytes, *, timeout: float,
               expect: int | None = None) -> Pushed:
    """Store ``data`` as the config, unless the key moved since it was read (module docstring).

    ``expect`` is the revision the caller saw (0: nothing pushed); another one is a
    ``RevisionConflict``. Validating ``data`` is the caller's job.
    """
    now = await current_config(client, cluster, timeout=timeout)
    base = now.revision if now is not None else 0
    if expect is not None and expect != base:
        raise RevisionConflict(_moved(cluster, expect, base))
    if now is not None and now.data == data:
        return Pushed(base, base, changed=False)
    return await _swap(client, cluster, data, base=base, timeout=timeout)


async def _swap(client: aetcd.Client, cluster: str, data: bytes, *, base: int, timeout: float) -> Pushed:
    """Write ``data`` if the key is still at ``base``: the one transaction every write is."""
    key = config_key(cluster)
    txn = rpc.TxnRequest(
        compare=[rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=base)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=data))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
    )

    async def op() -> Any:
        return await client.kvstub.Txn(txn, timeout=timeout, metadata=client.metadata)

    resp = await _call(client, op, timeout=timeout)
    if not resp.succeeded:
        kvs = resp.responses[0].response_range.kvs
        raise RevisionConflict(_moved(cluster, base, kvs[0].mod_revision if kvs else 0, racing=True))
    # The put is the transaction's only write: the store's new revision is the key's.
    return Pushed(int(resp.header.revision), base, changed=True)


def _moved(cluster: str, expected: int, found: int, *, racing: bool = False) -> str:
    what = "another push made it" if racing else "it is"
    return (f"the config of cluster {cluster!r} is not at revision {expected}: {what} revision {found}; "
            "nothing written (see 'hapax config diff', then push again)")


async def rollback_config(
    client: aetcd.Client, cluster: str, revision: int, *, timeout: float,
    check: Callable[[StoredConfig], bool], expect: int | None = None,
) -> Pushed | None:
    """Push the bytes of ``revision`` again, as a new revision; ``None`` when ``check`` refuses them.

    ``check`` validates them (a config valid then may not be now: a provider type since
    removed). The push compares against the revision read before the old one was, so a
    push in between is a ``RevisionConflict``.
    """
    now = await current_config(client, cluster, timeout=timeout)
    base = now.revision if now is not None else 0
    if expect is not None and expect != base:
        raise RevisionConflict(_moved(cluster, expect, base))
    old = await get_config(client, cluster, timeout=timeout, revision=revision)
    if not check(old):
        return None
    return await push_config(client, cluster, old.data, timeout=timeout, expect=base)


def config_diff(stored: StoredConfig | None, data: bytes, *, cluster: str, name: str) -> list[str]:
    """``diff -u`` of the config in force (``stored``) against ``data``; empty when they are equal."""
    if stored is not None and stored.data == data:
        return []
    before = stored.data.decode("utf-8", "replace") if stored is not None else ""
    label = f"{config_key(cluster).decode()}@{stored.revision}" if stored is not None else \
        f"{config_key(cluster).decode()} (nothing pushed)"
    lines = list(difflib.unified_diff(before.splitlines(keepends=True),
                                      data.decode("utf-8", "replace").splitlines(keepends=True),
                                      fromfile=label, tofile=name))
    # Bytes that differ but decode the same (a bad UTF-8 byte each side) still differ.
    return lines or [f"Binary files {label} and {name} differ\n"]
