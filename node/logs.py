"""Logs: one object per line (JSON, or text for humans), written off the event loop.

Theory of operation: every line, access line or not, goes into one in-memory
``LineWriter``; a background thread writes what has gathered to stderr every
``FLUSH_INTERVAL`` seconds (at once for warnings and errors) in one ``write``.
The loop only encodes and appends, so a slow stderr never stalls a request.

- Access lines skip ``logging``: the gateway hands its fields to
  ``AccessWriter`` (the core's access sink), which encodes them with orjson
  straight away (no LogRecord, formatter, handler lock or flush per request).
  Their keys and format are those of every other line: ts, level, logger, msg,
  then the fields.
- A crash loses at most the last ``FLUSH_INTERVAL`` of lines; a clean stop
  (and interpreter exit) flushes everything.
- When stderr is a slow pipe the writer thread blocks in ``write``, not the
  loop; lines wait in memory up to ``MAX_PENDING_LINES``. Beyond that new
  lines are dropped and counted (``hapax_log_lines_dropped_total``), and a
  warning with the number dropped is written once the pipe drains again.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from hapax.config import LoggingConfig

#: Seconds between writes: the most a crash can lose, and few enough wake-ups to cost nothing.
FLUSH_INTERVAL = 0.1
#: Lines waiting for a slow stderr before new ones are dropped (~20 MB of access lines).
MAX_PENDING_LINES = 50_000

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "fields"}


class LineWriter:
    """Encoded lines for one file descriptor, written in batches by a daemon thread."""

    def __init__(
        self, fd: int = 2, *, interval: float = FLUSH_INTERVAL, max_pending: int = MAX_PENDING_LINES
    ) -> None:
        self.fd = fd
        self.interval = interval
        self.max_pending = max_pending
        self.dropped = 0
        #: Called once per dropped line (the node counts it in its metrics).
        self.on_drop: Callable[[], None] | None = None
        # deque.append and popleft are atomic: the loop appends, the writer pops, no lock needed.
        self._lines: collections.deque[bytes] = collections.deque()
        self._io = threading.Lock()  # one batch on the fd at a time, so lines never interleave
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._reported = 0
        self._piece: int | None = None

    def shared(self) -> None:
        """Other processes write to the same fd (sibling workers): write in pieces of whole
        lines no larger than ``PIPE_BUF``, which a pipe never interleaves with another
        writer's, so no line is cut by a sibling's."""
        self._piece = select.PIPE_BUF

    def write(self, line: bytes, *, urgent: bool = False) -> None:
        """Queue one line (newline included); ``urgent`` wakes the writer now."""
        lines = self._lines
        if len(lines) >= self.max_pending:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return
        lines.append(line)
        if self._pid != os.getpid():  # first line in this process (or a forked child)
            self._start()
        if urgent:
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Write everything queued now, from the calling thread (shutdown, exit); waits at most
        ``timeout`` for a batch already on its way, so a stuck stderr cannot hang the exit."""
        self._drain(timeout)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="hapax-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self._drain()

    def _drain(self, timeout: float = -1) -> None:
        if not self._io.acquire(timeout=timeout):
            return
        try:
            lines = self._lines
            batch = [lines.popleft() for _ in range(len(lines))]
            dropped = self.dropped
            if dropped != self._reported:
                note = _json_line("warning", "hapax.log", "log lines dropped: stderr is not keeping up",
                                  {"dropped": dropped - self._reported})
                self._reported = dropped
                batch.append(note)
            if not batch:
                return
            if self._piece is None:
                self._write_all(b"".join(batch))
                return
            # Pieces of whole lines, each at most PIPE_BUF: the kernel never splits one.
            piece: list[bytes] = []
            size = 0
            for line in batch:
                if size + len(line) > self._piece and piece:
                    self._write_all(b"".join(piece))
                    piece, size = [], 0
                piece.append(line)
                size += len(line)
            if piece:
                self._write_all(b"".join(piece))
        finally:
            self._io.release()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone (closed pipe): nothing useful left to do with the lines
            view = view[n:]


class _Clock:
    """The ``ts`` of a line, with the per-second part formatted once per second."""

    def __init__(self) -> None:
        self._sec = -1
        self._iso = ""
        self._local = ""

    def iso(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._tick(sec)
        return self._iso + _MILLIS[int((now - sec) * 1000)]

    def local(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._tick(sec)
        return f"{self._local},{int((now - sec) * 1000):03d}"  # logging's default asctime

    def _tick(self, sec: int) -> None:
        self._sec = sec
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))


def _json_line(level: str, logger: str, msg: str, fields: dict[str, Any], *, now: float | None = None) -> bytes:
    out = {"ts": _CLOCK.iso(time.time() if now is None else now), "level": level, "logger": logger, "msg": msg}
    out.update(fields)
    return orjson.dumps(out, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _text_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]
#: An access line up to its fields: spliced in front of the fields' own JSON object.
_ACCESS_HEAD = b'{"ts":"%s","level":"info","logger":"hapax.access","msg":"request"'


class AccessWriter:
    """The node's access sink for the gateway: one encoded line per request, queued."""

    def __init__(self, writer: LineWriter) -> None:
        self.writer = writer
        self.enabled = True
        self.json = True

    def __call__(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if self.json:
            body = orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
            # The same bytes as dumping {ts, level, logger, msg, **fields}, without building that dict.
            head = _ACCESS_HEAD % _CLOCK.iso(now).encode()
            line = head + (b"," + body[1:] if len(body) > 3 else b"}\n")
        else:
            line = f"{_CLOCK.local(now)} INFO hapax.access: request {_text_fields(fields)}\n".encode()
        self.writer.write(line)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            base += " " + _text_fields(fields)
        return base


class WriterHandler(logging.Handler):
    """``logging`` into the same writer, so access and other lines keep their order on stderr."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode()
        except Exception:
            self.handleError(record)
            return
        self.writer.write(line, urgent=record.levelno >= logging.WARNING)


_CLOCK = _Clock()
WRITER = LineWriter()
ACCESS = AccessWriter(WRITER)
atexit.register(WRITER.flush)


def configure(cfg: LoggingConfig) -> None:
    root = logging.getLogger()
    handler = WriterHandler(WRITER)
    if cfg.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    # Access lines are info lines: on with access_log, and only at level info or debug.
    ACCESS.enabled = cfg.access_log and cfg.level in ("debug", "info")
    ACCESS.json = cfg.format == "json"
    logging.getLogger("hapax.access").disabled = not cfg.access_log
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def flush() -> None:
    WRITER.flush()
