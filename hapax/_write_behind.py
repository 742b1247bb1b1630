"""Writes that leave the event loop: one thread per store, its writes coalesced.

Theory of operation: a store (keys, usage, audit) changes its memory on the
loop at once, then calls ``submit``: that marks the store's one write job
pending and wakes the store's thread. A job already pending is not queued
again, so a burst of changes costs one write, and the job reads the store's
latest state when it runs, not when it was asked for. The thread does what
the loop must never wait for: the advisory lock, the write, the fsync.

- A job may ask to run again after a delay by returning the seconds (the
  audit closes its one-second windows of failed authentications so); ``None``
  means "only when submitted again".
- A job that raises is logged and retried after ``RETRY_S``: what it should
  have written is still in memory, and a disk that came back gets it.
- ``flush(timeout)`` returns once nothing is pending and no job runs, or
  ``False`` at the timeout: the node calls it at shutdown, off the loop, so a
  SIGTERM right after a change still leaves the change on disk, and a stuck
  disk (a FIFO nobody reads, a lock a hung process holds) cannot hang the exit.
- One thread per store: a stuck audit directory does not hold back the keys.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("hapax.state")

#: Seconds before a failed write is tried again; often enough to catch a disk that came back.
RETRY_S: Final = 1.0

Job = Callable[[], float | None]


class WriteBehind:
    """One daemon thread that runs ``job`` whenever it was submitted since the last run."""

    def __init__(self, name: str, job: Job) -> None:
        self.name = name
        self._job = job
        self._cond = threading.Condition(threading.Lock())
        self._pending = False
        self._running = False
        #: When the job wants to run again on its own (monotonic seconds), if it does.
        self._again: float | None = None
        #: The last run raised: a flush that ends on it did not write everything.
        self._failed = False
        self._pid = 0
        self._thread: threading.Thread | None = None

    def submit(self) -> None:
        """Persist the store's state soon; returns at once."""
        with self._cond:
            if self._pid != os.getpid():  # first write in this process (or a forked child)
                self._start()
            if not self._pending:
                self._pending = True
                self._cond.notify()

    @property
    def busy(self) -> bool:
        """A write is pending or running (for tests and shutdown messages)."""
        return self._pending or self._running

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted write is done; ``False`` if that took longer than ``timeout``.

        Called from a thread other than the writer's (the node's shutdown runs it through
        ``asyncio.to_thread``); a delayed rerun is run now, since nothing comes later.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._again is not None and self._thread is not None:
                self._again = None
                self._pending = True
                self._cond.notify()
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return not self._failed

    def _start(self) -> None:
        self._pid = os.getpid()
        self._pending = False
        self._running = False
        self._thread = threading.Thread(target=self._run, name=f"hapax-{self.name}-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._pending:
                    wait = None if self._again is None else self._again - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    cond.wait(wait)
                self._pending = False
                self._again = None
                self._running = True
            again: float | None
            failed = False
            try:
                again = self._job()
            except Exception:
                log.exception("%s write failed; retrying in %gs (the data is still in memory)", self.name, RETRY_S)
                again, failed = RETRY_S, True
            with cond:
                self._running = False
                self._failed = failed
                if again is not None:
                    self._again = time.monotonic() + again
                cond.notify_all()
