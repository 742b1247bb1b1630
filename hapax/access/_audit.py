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
moved it. A node never appends on its event loop: ``QueuedAudit`` queues
events (bounded) and a background thread appends them in batches; failed
authentications are folded into one counted ``auth.failed`` record per
(second, reason, remote, actor), so a flood of bad keys cannot fill the disk
or slow the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._files import locked
from .._write_behind import WriteBehind

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

    def auth_failed(
        self, *, reason: str, actor: str, remote: str, request_id: str, path: str, now: float | None = None
    ) -> None:
        """A rejected credential; ``QueuedAudit`` folds a flood of them into counted records."""
        self.record("auth.failed", actor=actor, remote=remote, request_id=request_id,
                    details={"reason": reason, "path": path}, now=now)

    def wait_written(self, timeout: float) -> bool:
        """Block until every event is written (``False`` at the timeout); not on the loop."""
        return True

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
        return self.write_batch([(event, now, fields)])[0]

    def write_batch(self, items: list[tuple[str, float, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Chain and append ``(event, now, fields)`` items under one lock, in one ``write``."""
        with self._locked():
            if self._stat() != self._known:
                self._sync_tail()
            st = self._known
            now = items[-1][1]
            if st is not None and st[1] >= self.max_bytes:
                os.replace(self.path, self.dir / f"audit-{self._first_seq():012d}.jsonl")
                self._expire(now)
            seq, prev = self._seq, self._prev
            events = [self._next(event, t, fields) for event, t, fields in items]
            data = b"".join([orjson.dumps(ev) + b"\n" for ev in events])
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                self._seq, self._prev = seq, prev  # not written: the chain goes on from the file
                self._known = None
                raise
            self._known = self._stat()
        return events

    def _first_seq(self) -> int:
        with self.path.open("rb") as f:
            first = f.readline()
        return int(orjson.loads(first)["seq"]) if first.strip() else self._seq + 1

    def _expire(self, now: float) -> None:
        cutoff = now - self.retention_days * 86400
        for f in audit_files(self.dir)[:-1]:
            if f.name != LIVE and f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)


#: Events waiting for a stuck or slow audit directory before new ones are dropped (and counted).
DEFAULT_QUEUE_SIZE = 10_000
#: (second, reason, remote, actor) windows of failed authentications held at once; a flood
#: from more sources than this in the time the writer is behind is counted as dropped.
MAX_FAILURE_WINDOWS = 1_000


class QueuedAudit(Audit):
    """The node's audit log: ``record`` queues, a ``WriteBehind`` thread writes ``FileAudit`` batches.

    Theory of operation: the loop appends ``(event, time, fields)`` to a bounded
    queue and wakes the writer; the writer drains everything queued into one
    locked, chained append. Failed authentications are not queued one by one: each
    adds to a count in its window, one per (wall-clock second, reason, remote,
    actor), and a closed window becomes one ``auth.failed`` record carrying its
    ``count`` (the first failure's request id and path). So a flood of bad keys
    costs the loop a dict update per request and the disk one line per source per
    second. When the queue or the window table is full, what does not fit is
    dropped, counted (``on_drop``, the node's ``hapax_audit_events_dropped_total``),
    and said in the log itself: the next batch carries an ``audit.dropped`` event
    with the number lost since the last one.
    """

    def __init__(
        self, sink: FileAudit, *, queue_size: int = DEFAULT_QUEUE_SIZE, max_windows: int = MAX_FAILURE_WINDOWS
    ) -> None:
        super().__init__(keep=0)
        self.sink = sink
        self.queue_size = queue_size
        self.max_windows = max_windows
        self.dropped = 0
        #: Called once per dropped event (the node counts it in its metrics).
        self.on_drop: Callable[[], None] | None = None
        # deque.append and popleft are atomic: the loop appends, the writer pops.
        self._queue: deque[tuple[str, float, dict[str, Any]]] = deque()
        #: (second, reason, remote, actor) -> [count, first time, first request id, first path]
        self._windows: dict[tuple[int, str, str, str], list[Any]] = {}
        self._mutex = threading.Lock()  # the window table, between the loop and the writer
        self._reported = 0
        self._closing = False
        self._writer = WriteBehind("audit", self._drain)

    def record(
        self, event: str, *, actor: str, remote: str = "", request_id: str = "", target: str | None = None,
        details: dict[str, Any] | None = None, now: float | None = None,
    ) -> dict[str, Any]:
        fields = {"actor": actor, "remote": remote, "request_id": request_id, "target": target,
                  "details": details or {}}
        if len(self._queue) >= self.queue_size:
            self._drop()
        else:
            self._queue.append((event, time.time() if now is None else now, fields))
            self._writer.submit()
        return fields

    def auth_failed(
        self, *, reason: str, actor: str, remote: str, request_id: str, path: str, now: float | None = None
    ) -> None:
        t = time.time() if now is None else now
        key = (int(t), reason, remote, actor)
        with self._mutex:
            w = self._windows.get(key)
            if w is not None:
                w[0] += 1
                return
            full = len(self._windows) >= self.max_windows
            if not full:
                self._windows[key] = [1, t, request_id, path]
        if full:
            self._drop()
        else:
            self._writer.submit()  # a new window: the writer closes it when its second is over

    def _drop(self) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop()

    def _drain(self) -> float | None:
        """The writer's job: write what is queued and the windows that closed; when to run again."""
        q = self._queue
        items = [q.popleft() for _ in range(len(q))]
        now = time.time()
        cutoff = float("inf") if self._closing else int(now)
        with self._mutex:
            closed = [k for k in self._windows if k[0] < cutoff]
            windows = [(k, self._windows.pop(k)) for k in closed]
            left = bool(self._windows)
        for (_sec, reason, remote, actor), (count, first, request_id, path) in windows:
            items.append(("auth.failed", first, {
                "actor": actor, "remote": remote, "request_id": request_id, "target": None,
                "details": {"reason": reason, "path": path, "count": count},
            }))
        dropped = self.dropped
        if dropped != self._reported:
            items.append(("audit.dropped", now, {
                "actor": "system", "remote": "", "request_id": "", "target": None,
                "details": {"dropped": dropped - self._reported,
                            "why": "the audit queue was full: the audit directory did not keep up"},
            }))
        if items:
            items.sort(key=lambda it: it[1])  # in time order within a batch (windows close late)
            try:
                self.sink.write_batch(items)
            except BaseException:
                q.extendleft(reversed([it for it in items if it[0] != "audit.dropped"]))
                raise
            self._reported = dropped
        # An open window closes at the end of its second: come back then.
        return max(0.0, int(now) + 1 - now) + 0.001 if left else None

    def wait_written(self, timeout: float) -> bool:
        self._closing = True  # shutting down: open windows are written now, not at their second's end
        return self._writer.flush(timeout)


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


def make_audit(cfg: Config, state_dir: Path | None, *, write_behind: bool = False) -> Audit:
    """The audit trail the config asks for: off, in memory, or files under the state directory
    (appended by a background thread with ``write_behind``, inline without: the CLI)."""
    if not cfg.audit.enabled:
        return Audit(keep=0)
    path = cfg.audit.path or (str(state_dir / "audit") if state_dir else None)
    if path is None:
        return Audit()
    sink = FileAudit(
        path, max_bytes=cfg.audit.max_bytes, retention_days=cfg.audit.retention_days, fsync=cfg.audit.fsync
    )
    return QueuedAudit(sink, queue_size=cfg.audit.queue_size) if write_behind else sink
