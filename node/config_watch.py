"""The config file as a ``ConfigSource``: polled, settled, read and parsed off the loop.

Theory of operation: every ``server.reload_interval`` seconds (at once after
``poke``, which SIGHUP calls) the file is ``stat``ed through its symlinks: its
mtime, size, inode and device are its stamp. A Kubernetes ConfigMap update
swaps the ``..data`` symlink to a new directory, which changes the inode and
device even when size and mtime happen to match, so the swap is seen.

A changed stamp must hold still for ``SETTLE_S`` before the file is read (an
editor writing in place is rarely caught half-way, and a half-written file
fails validation when it is). Reading, hashing and parsing run in a thread.
The bytes' SHA-256 is the snapshot's digest: bytes already looked at (a
``touch``, a rewrite of the same content) are not parsed again. What was
parsed goes to ``hapax.config.Revisions``, which keeps the last good snapshot and
decides whether there is a new revision (an equal config is none).

Nothing a file does stops the watcher: a round that fails for any reason is
logged and yielded as a ``ConfigRejected``, and the next round runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from hapax import ConfigError
from hapax.config import (
    Config,
    ConfigEvent,
    ConfigRejected,
    ConfigSnapshot,
    ConfigSource,
    Revisions,
    config_from_bytes,
    digest_of,
)

log = logging.getLogger("hapax.node")

#: How long a changed config file must hold still before it is read, seconds.
SETTLE_S: Final = 0.1

Stamp = tuple[int, int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What changes when the file does; ``stat`` follows symlinks (see the module docstring)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class FileConfigSource(ConfigSource):
    def __init__(
        self,
        path: Path,
        initial: Config,
        *,
        interval: Callable[[], float],
        prepare: Callable[[Config], Config] | None = None,
    ) -> None:
        """``initial`` is the config the node starts on (read from ``path`` by the CLI);
        ``interval`` gives the poll period in force; ``prepare`` applies the command
        line's overrides (``--port``, ``--redis``) to every config read, as to the first."""
        self.path = path
        self.name = f"file:{path}"
        self._interval = interval
        self._prepare = prepare
        self._stamp = file_stamp(path)
        try:
            digest = digest_of(path.read_bytes())
        except OSError:
            digest = ""
        self._revisions = Revisions(ConfigSnapshot(initial, 1, self.name, digest))
        self._poked = asyncio.Event()

    @property
    def current(self) -> ConfigSnapshot:
        return self._revisions.current

    def poke(self) -> None:
        self._poked.set()

    async def updates(self) -> AsyncIterator[ConfigEvent]:
        while True:
            try:
                event = await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A watcher that died would take reloads with it, silently, until a restart.
                log.exception("config watcher failed; keeping the last good config and watching on")
                yield ConfigRejected(ConfigError(f"the config watcher failed: {type(exc).__name__}"), self.name)
                await asyncio.sleep(self._interval())  # one line per interval for a fault that repeats
                continue
            if event is not None:
                yield event

    async def _round(self) -> ConfigEvent | None:
        interval = self._interval()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poked.wait(), interval)
        # Asked by the event, not by how the wait ended: a poke that lands as the wait times
        # out would otherwise be cleared unseen, and that SIGHUP would do nothing.
        forced = self._poked.is_set()
        self._poked.clear()
        stamp = file_stamp(self.path)
        if not forced:
            if stamp == self._stamp:
                return None
            await asyncio.sleep(min(SETTLE_S, interval))
            if file_stamp(self.path) != stamp:
                return None  # still changing: the next round looks again
        self._stamp = stamp
        loaded = await asyncio.to_thread(self._load, forced)
        if loaded is None:
            self._unchanged("same bytes")
            return None
        result, digest = loaded
        event = self._revisions.offer(result, digest=digest)
        if event is None:
            self._unchanged("same config")
        return event

    def _unchanged(self, why: str) -> None:
        # Rare (someone touched or rewrote the file) and worth a line: why nothing was applied.
        log.info("config file unchanged; the revision stays", extra={"fields": {
            "source": self.name, "why": why, "revision": self.current.revision}})

    def _load(self, forced: bool) -> tuple[Config | ConfigError, str] | None:
        """Read, hash and parse the file (in a thread); ``None`` for bytes already looked at."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            return ConfigError(f"cannot read {self.path}: {exc.strerror}"), ""
        digest = digest_of(raw)
        if not forced and self._revisions.unchanged(digest):
            return None  # a touch, or the same bytes written again: nothing to parse
        try:
            cfg = config_from_bytes(raw)
            if self._prepare is not None:
                cfg = self._prepare(cfg)
        except ConfigError as exc:
            return exc, digest
        except Exception as exc:  # parsing should raise nothing else; if it does, still keep serving
            log.exception("config reload failed unexpectedly")
            return ConfigError(f"unexpected {type(exc).__name__} while loading"), digest
        return cfg, digest
