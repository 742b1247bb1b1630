"""API keys: minting, hashing, and the stores that keep them.

Theory of operation: a key is ``hpx_`` followed by 32 random bytes in
url-safe base64 (43 characters). It is shown once, when minted or rotated;
what is stored is its SHA-256, which is enough for a key with 256 bits of
entropy (no salt or slow hash needed: there is nothing to guess). A lookup
hashes the presented credential, finds the record by digest and compares the
digests again with ``hmac.compare_digest``.

A ``KeyStore`` holds ``KeyRecord`` objects by id. Three backends:

- ``MemoryKeyStore``: one process, gone on exit (tests, demos);
- ``FileKeyStore``: one JSON file, rewritten atomically (temp file, fsync,
  rename, fsync of the directory) under an advisory lock, so the CLI and a
  running node can both change it. The node re-reads the file when its
  modification stamp changes, so a key revoked by the CLI stops working on
  the next request. In a node the writes happen on a background thread
  (``hapax._write_behind``): a change is in force at once, on disk soon after;
- ``RedisKeyStore`` (``hapax.access._keys_redis``): shared by every node and worker
  of a cluster, read from a local copy kept fresh by pub/sub.

Lookups on the request path (``by_hash``) are synchronous dict reads in every
backend. The async half of the seam (``fetch`` after a miss, ``save``,
``refreshed``, ``start``/``aclose``) is a no-op or a plain ``put`` for the local
stores and where a shared store talks to its backend.

``last_used_at`` changes on every call; it is kept in memory and written with
the next change or ``flush`` (a lost last-used time is harmless, an fsync per
request is not).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from .._files import atomic_write, locked
from .._write_behind import WriteBehind
from ..config import Budget, RateLimits

KEY_PREFIX = "hpx_"
#: 256 bits: brute force is out of reach, so a plain SHA-256 is a safe stored form.
KEY_BYTES = 32
ID_PREFIX = "key_"

Role = Literal["admin", "operator", "developer", "viewer"]


def mint_secret() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode()


def new_key_id() -> str:
    return ID_PREFIX + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_key(secret: str) -> bool:
    return secret.startswith(KEY_PREFIX) and len(secret) >= len(KEY_PREFIX) + 43


class KeyRecord(BaseModel):
    """One API key as stored: never the secret, only its hash and a short hint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str = Field(min_length=1, max_length=200)
    owner: str = Field("", max_length=200)
    team: str | None = Field(None, max_length=100)
    role: Role = "developer"
    #: Public model names the key may call; ``None`` means every model.
    models: tuple[str, ...] | None = None
    limits: RateLimits = Field(default_factory=RateLimits)
    budget: Budget = Field(default_factory=Budget)
    #: Highest queue priority (0 most urgent) the key may ask for.
    max_priority: int = Field(0, ge=0, le=9)
    default_priority: int = Field(5, ge=0, le=9)
    #: Unix seconds; ``None`` never expires.
    expires_at: float | None = None
    created_at: float
    last_used_at: float | None = None
    rotated_at: float | None = None
    revoked_at: float | None = None
    #: SHA-256 of the secret, hex.
    hash: str
    #: The first characters of the secret, so people can tell keys apart in lists.
    hint: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash; times as ISO 8601 UTC."""
        out = self.model_dump(mode="json", exclude={"hash"})
        for name in _TIMES:
            out[name] = iso_utc(out[name])
        out["revoked"] = self.revoked
        return out


#: Stored as Unix seconds (cheap to compare on the hot path), shown as ISO 8601.
_TIMES = ("expires_at", "created_at", "last_used_at", "rotated_at", "revoked_at")


def iso_utc(t: float | None) -> str | None:
    """``2026-12-01T13:05:09Z``: what people and log tools read; ``None`` stays ``None``."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def hint_of(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + 6] + "..."


class KeyStore(ABC):
    """Keys by id and by hash. Implementations must make ``put`` visible to ``by_hash`` at once."""

    @abstractmethod
    def by_hash(self, digest: str) -> KeyRecord | None: ...

    @abstractmethod
    def get(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    def all(self) -> list[KeyRecord]: ...

    @abstractmethod
    def put(self, record: KeyRecord) -> None: ...

    @abstractmethod
    def touch(self, key_id: str, now: float) -> None:
        """Note a use; cheap, persisted lazily."""

    def flush(self) -> None:
        return None

    #: Called after the store changed under the caller (another node's write); set by the owner.
    on_change: Callable[[], None] | None = None

    async def start(self) -> None:
        """Load what a shared store keeps elsewhere; call once the event loop runs."""
        return None

    async def aclose(self) -> None:
        """Stop background work, writing what is pending."""
        return None

    async def fetch(self, digest: str) -> KeyRecord | None:
        """The record for ``digest`` after ``by_hash`` missed: a shared store asks its backend
        (a key made on another node a moment ago); a local store has nothing more to say."""
        return None

    async def save(self, record: KeyRecord) -> None:
        """``put``, awaited: a shared store returns once the write is durable there, or raises."""
        self.put(record)

    async def refreshed(self) -> None:
        """Bring in what other processes noted lazily (last-used times) before a listing."""
        return None


class MemoryKeyStore(KeyStore):
    def __init__(self) -> None:
        self._by_id: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, str] = {}
        #: Last-used times not yet folded into the records: a dict store per call, not a copy.
        self._used: dict[str, float] = {}

    def _load(self, records: list[KeyRecord]) -> None:
        self._by_id = {r.id: r for r in records}
        self._by_hash = {r.hash: r.id for r in records}

    def by_hash(self, digest: str) -> KeyRecord | None:
        key_id = self._by_hash.get(digest)
        if key_id is None:
            return None
        rec = self._by_id[key_id]
        # The dict lookup found it by equality; compare again in constant time so the
        # check itself never depends on timing.
        return rec if hmac.compare_digest(rec.hash, digest) else None

    def _fold(self) -> None:
        for key_id, t in self._used.items():
            rec = self._by_id.get(key_id)
            if rec is not None and rec.last_used_at != t:
                self._by_id[key_id] = rec.model_copy(update={"last_used_at": t})

    def get(self, key_id: str) -> KeyRecord | None:
        self._fold()
        return self._by_id.get(key_id)

    def all(self) -> list[KeyRecord]:
        self._fold()
        return sorted(self._by_id.values(), key=lambda r: (r.created_at, r.id))

    def put(self, record: KeyRecord) -> None:
        old = self._by_id.get(record.id)
        if old is not None and old.hash != record.hash:
            self._by_hash.pop(old.hash, None)
        self._by_id[record.id] = record
        self._by_hash[record.hash] = record.id

    def touch(self, key_id: str, now: float) -> None:
        self._used[key_id] = now


class FileKeyStore(MemoryKeyStore):
    """Keys in ``<dir>/keys.json``; every write is a locked read-merge-atomic-write.

    A change is in memory at once (``put`` is visible to ``by_hash`` before any disk is
    touched) and noted as pending; ``_write`` merges the pending records and last-used
    times into what the file holds now (the CLI may have changed it) and replaces it.
    With ``write_behind`` that runs on a ``WriteBehind`` thread, so the loop never waits
    on the lock or the fsync; without (the CLI, tests) it runs inline, before ``put``
    returns. The writer hands back what it wrote with the file's stamp, so the node's
    next lookup takes the records as they are instead of parsing its own file again.
    """

    FILE = "keys.json"

    def __init__(self, directory: str | os.PathLike[str], *, write_behind: bool = False) -> None:
        super().__init__()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / self.FILE
        self._path_str = str(self.path)  # os.stat on a str skips pathlib's per-call overhead
        self._lock_path = self.dir / ".keys.lock"
        self._stamp: tuple[int, int, int] | None = None
        self._dirty_use = False
        #: Guards the hand-over between the loop and the writer: ``_pending``, ``_inflight``
        #: and ``_written`` (never held across I/O).
        self._mutex = threading.Lock()
        #: Records changed here and not yet on their way to disk.
        self._pending: dict[str, KeyRecord] = {}
        #: Records the writer is writing now; a reload from disk keeps them until it is done.
        self._inflight: dict[str, KeyRecord] = {}
        #: The stamp of the file the writer last wrote, and the records it holds.
        self._written: tuple[tuple[int, int, int] | None, list[KeyRecord]] | None = None
        self._writer = WriteBehind("keys", self._write) if write_behind else None
        self._refresh()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path_str)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> list[KeyRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [KeyRecord.model_validate(r) for r in orjson.loads(raw).get("keys", [])]

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        written = self._written
        records = written[1] if written is not None and written[0] == stamp else self._read()
        with self._mutex:
            overlay = [*self._inflight.values(), *self._pending.values()]
        self._load(records)
        for rec in overlay:  # changes made here that the file does not hold yet
            MemoryKeyStore.put(self, rec)
        self._stamp = stamp

    def _persist(self) -> None:
        if self._writer is not None:
            self._writer.submit()
        else:
            self._write()

    def _write(self) -> None:
        """Merge what changed here into the file as it is now; the writer thread's job."""
        with self._mutex:
            batch, self._pending = self._pending, {}
            self._inflight.update(batch)
            inflight = dict(self._inflight)
        # A copy of a str-keyed dict is one step under the GIL: safe against the loop's touch().
        used = self._used.copy()
        try:
            with locked(self._lock_path):
                by_id = {r.id: r for r in self._read()}
                by_id.update(inflight)
                for key_id, t in used.items():
                    rec = by_id.get(key_id)
                    if rec is not None and (rec.last_used_at is None or rec.last_used_at < t):
                        by_id[key_id] = rec.model_copy(update={"last_used_at": t})
                records = sorted(by_id.values(), key=lambda r: (r.created_at, r.id))
                data = {"version": 1, "keys": [r.model_dump(mode="json") for r in records]}
                atomic_write(self.path, orjson.dumps(data, option=orjson.OPT_INDENT_2))
                stamp = self._file_stamp()
        except BaseException:
            with self._mutex:  # back to pending, so the retry writes them; a newer put wins
                self._pending = {**self._inflight, **self._pending}
                self._inflight = {}
            raise
        with self._mutex:
            self._written = (stamp, records)
            for key_id, rec in inflight.items():
                if self._inflight.get(key_id) is rec:
                    del self._inflight[key_id]
        return None

    def wait_written(self, timeout: float) -> bool:
        """Block until every change is on disk (``False`` at the timeout); not on the loop."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def by_hash(self, digest: str) -> KeyRecord | None:
        # A stat per lookup (~1 µs) is what makes a CLI revocation take effect at once.
        self._refresh()
        return super().by_hash(digest)

    def get(self, key_id: str) -> KeyRecord | None:
        self._refresh()
        return super().get(key_id)

    def all(self) -> list[KeyRecord]:
        self._refresh()
        return super().all()

    def put(self, record: KeyRecord) -> None:
        self._refresh()
        super().put(record)
        with self._mutex:
            self._pending[record.id] = record
        self._persist()

    def touch(self, key_id: str, now: float) -> None:
        super().touch(key_id, now)
        self._dirty_use = True

    def flush(self) -> None:
        if not self._dirty_use:
            return
        self._dirty_use = False
        self._persist()
