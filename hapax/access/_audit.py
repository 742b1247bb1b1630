"""The audit log: append-only JSON lines, hash-chained, rotated, verifiable.

Theory of operation: every privileged or security-relevant act (a key
created, rotated, revoked or changed; a role change; a config change; an
admin API call; an authentication failure; a budget exhausted) becomes one
event, one JSON object per line:

    {"seq": 7, "ts": "2025-08-15T10:00:00.123Z", "event": "key.created",
     "actor": "key_ab12...", "remote": "10.0.0.5", "request_id": "req_...",
     "target": "key_cd34...", "details": {...}, "prev": "<hash of event 6>",
     "hash": "<sha256 of this object without 'hash', keys sorted>"}

``prev`` chains each event to the one before it (64 zeros for the first), so
editing, removing or reordering a line breaks the chain at that line, and
``verify`` names it. The chain proves the file was not altered after the fact
by someone who did not also rewrite every later event; ship the files off the
machine to protect against that.

The live file is ``audit.jsonl`` in the audit directory. Past
``max_bytes`` it is renamed ``audit-<first seq, 12 digits>.jsonl`` and a new
one continues the same chain. Rotated files older than ``retention_days`` are
deleted; ``verify`` then reports where the remaining chain starts.

The CLI and a node may append to the same directory: appends hold an
advisory lock and pick up the chain's tail from the file if another writer
moved it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._files import locked

if TYPE_CHECKING:
    from ..config import Config

GENESIS = "0" * 64
LIVE = "audit.jsonl"
_ROTATED = re.compile(r"^audit-(\d{12})\.jsonl$")


def event_hash(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class Audit:
    """Where events go. This base keeps the last few in memory (no state dir)."""

    def __init__(self, *, keep: int = 1000) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._seq = 0
        self._prev = GENESIS

    def _next(self, event: str, now: float, fields: dict[str, Any]) -> dict[str, Any]:
        ev: dict[str, Any] = {"seq": self._seq + 1, "ts": _iso(now), "event": event, **fields,
                              "prev": self._prev}
        ev["hash"] = event_hash(ev)
        self._seq = ev["seq"]
        self._prev = ev["hash"]
        return ev

    def record(
        self, event: str, *, actor: str, remote: str = "", request_id: str = "", target: str | None = None,
        details: dict[str, Any] | None = None, now: float | None = None,
    ) -> dict[str, Any]:
        fields = {"actor": actor, "remote": remote, "request_id": request_id, "target": target,
                  "details": details or {}}
        ev = self._write(event, time.time() if now is None else now, fields)
        self.recent.append(ev)
        return ev

    def _write(self, event: str, now: float, fields: dict[str, Any]) -> dict[str, Any]:
        return self._next(event, now, fields)

    def close(self) -> None:
        return None


class FileAudit(Audit):
    def __init__(
        self, directory: str | os.PathLike[str], *, max_bytes: int, retention_days: int, fsync: bool = False
    ) -> None:
        super().__init__(keep=100)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / LIVE
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.fsync = fsync
        self._known: tuple[int, int] | None = None  # (inode, size) after our last write
        with self._locked():
            self._sync_tail()
            self._expire(time.time())

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.dir / ".audit.lock")

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size)

    def _sync_tail(self) -> None:
        """Take seq and prev from the newest event on disk (another writer may have appended)."""
        for f in reversed(audit_files(self.dir)):
            last = _last_line(f)
            if last:
                ev = orjson.loads(last)
                self._seq, self._prev = int(ev["seq"]), str(ev["hash"])
                break
        else:
            self._seq, self._prev = 0, GENESIS
        self._known = self._stat()

    def _write(self, event: str, now: float, fields: dict[str, Any]) -> dict[str, Any]:
        with self._locked():
            if self._stat() != self._known:
                self._sync_tail()
            st = self._known
            if st is not None and st[1] >= self.max_bytes:
                os.replace(self.path, self.dir / f"audit-{self._first_seq():012d}.jsonl")
                self._expire(now)
            ev = self._next(event, now, fields)
            line = orjson.dumps(ev) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._known = self._stat()
        return ev

    def _first_seq(self) -> int:
        with self.path.open("rb") as f:
            first = f.readline()
        return int(orjson.loads(first)["seq"]) if first.strip() else self._seq + 1

    def _expire(self, now: float) -> None:
        cutoff = now - self.retention_days * 86400
        for f in audit_files(self.dir)[:-1]:
            if f.name != LIVE and f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)


def _last_line(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        chunk = 65536
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1].strip()
            chunk *= 2


def audit_files(directory: Path) -> list[Path]:
    """Rotated files oldest first, then the live file."""
    rotated = sorted((p for p in directory.iterdir() if _ROTATED.match(p.name)), key=lambda p: p.name)
    live = directory / LIVE
    return [*rotated, live] if live.exists() else rotated


@dataclass
class VerifyResult:
    ok: bool
    events: int = 0
    files: list[str] = field(default_factory=list)
    #: ``file:line: what is wrong``; the first is where the chain broke.
    problems: list[str] = field(default_factory=list)
    #: Set when the oldest remaining event is not the chain's first (retention removed files).
    starts_at_seq: int | None = None


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check a file or a directory of audit files; every altered line is named."""
    p = Path(path)
    files = audit_files(p) if p.is_dir() else [p]
    res = VerifyResult(ok=True, files=[str(f) for f in files])
    prev: str | None = None
    seq: int | None = None
    for f in files:
        with f.open("rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{f}:{n}"
                line = raw.strip()
                if not line:
                    res.problems.append(f"{where}: empty line")
                    continue
                try:
                    ev = orjson.loads(line)
                    if not isinstance(ev, dict):
                        raise ValueError("not an object")
                    got_seq, got_prev, got_hash = int(ev["seq"]), str(ev["prev"]), str(ev["hash"])
                except (ValueError, KeyError, TypeError) as exc:
                    res.problems.append(f"{where}: not an audit event ({exc})")
                    prev, seq = None, None
                    continue
                if event_hash(ev) != got_hash:
                    res.problems.append(f"{where}: event altered (hash does not match its content)")
                if prev is None and seq is None:
                    if got_prev != GENESIS or got_seq != 1:
                        res.starts_at_seq = got_seq
                else:
                    if got_prev != prev:
                        res.problems.append(f"{where}: chain broken (prev does not match the event before)")
                    if seq is not None and got_seq != seq + 1:
                        res.problems.append(f"{where}: sequence jumps from {seq} to {got_seq}")
                prev, seq = got_hash, got_seq
                res.events += 1
    res.ok = not res.problems
    return res


def make_audit(cfg: Config, state_dir: Path | None) -> Audit:
    """The audit trail the config asks for: off, in memory, or files under the state directory."""
    if not cfg.audit.enabled:
        return Audit(keep=0)
    path = cfg.audit.path or (str(state_dir / "audit") if state_dir else None)
    if path is None:
        return Audit()
    return FileAudit(
        path, max_bytes=cfg.audit.max_bytes, retention_days=cfg.audit.retention_days, fsync=cfg.audit.fsync
    )
