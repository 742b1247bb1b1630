"""A local copy of every key under an etcd prefix, kept current by a watch.

Theory of operation: ``start`` reads the whole prefix once (bounded by
``timeout``; it raises when etcd does not answer) and remembers the revision the
read was at. A task then watches the prefix from the next revision and applies
each response's events (puts and deletes) to the copy, in order. Nothing else
writes the copy, so readers on the event loop see a consistent view between
awaits.

``revision`` is the newest revision the copy is known to include: the read's
header revision, then the mod revision of the last event applied. A watch
response's header revision is not used to move it: etcd may send a batch of a
long catch-up with the store's current revision in the header while more events
are still to come, and resuming from there would skip them.

When the stream breaks (etcd stopped, a network cut, a GOAWAY), ``connected``
turns false and the task opens a new stream from ``revision + 1`` after a
backoff (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``, with jitter), so an outage
costs no event: etcd replays what happened meanwhile. When that revision has
been compacted away, etcd refuses the watch with the compact revision; the task
then reads the whole prefix again (the view may have skipped revisions, but it
is exact at the revision it reports) and watches on from there.

``on_change(view, revision)`` runs in the event loop after the first read,
after each applied response, and after each re-read: never concurrently, never
with a half-applied batch. It must not block; an exception in it is logged and
the watch goes on.

Prefix ranges are exact: ``/hapax/a/`` ranges ``[/hapax/a/, /hapax/a0)``, so
``/hapax/ab/...`` is not in it.

The stream is aetcd's channel with etcd's own Watch RPC under it (aetcd's
``watch`` hides the response boundaries and the compact revision of a resumed
watch, which this needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Final

import aetcd
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from ._cancel import raise_if_cancelling

log = logging.getLogger("hapax.coordinator")

#: Seconds before the first reconnect, doubled per failure up to ``BACKOFF_MAX``.
BACKOFF_MIN: Final = 0.05
#: A node without etcd retries this often at worst: an outage ends for it within about this much.
BACKOFF_MAX: Final = 1.0

_PUT: Final = 0  # mvccpb.Event.EventType
_DELETE: Final = 1
_EOF: Final[Any] = grpc.aio.EOF


class PrefixWatch:
    """Keeps a local copy of every key under a prefix; resumes from the last revision after a
    disconnect (no revision missed); full re-read on compaction; reconnect with backoff."""

    def __init__(
        self,
        client: aetcd.Client,
        prefix: bytes,
        *,
        on_change: Callable[[Mapping[bytes, bytes], int], None],
        timeout: float,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.range_end = prefix_range_end(prefix)
        self.on_change = on_change
        self.timeout = timeout
        self._view: dict[bytes, bytes] = {}
        #: The etcd revision the view is at (0 before ``start``).
        self.revision = 0
        #: The watch stream is up (created and not broken since).
        self.connected = False
        #: Full re-reads after a compaction; for tests and logs.
        self.rereads = 0
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None

    @property
    def view(self) -> Mapping[bytes, bytes]:
        """Key (full, with the prefix) -> value, as of ``revision``."""
        return self._view

    async def start(self) -> None:
        """Read the prefix (raises ``TimeoutError`` or an aetcd error), then watch it."""
        await asyncio.wait_for(self._read(), self.timeout)
        self._notify()
        self._task = asyncio.create_task(self._run(), name=f"watch {self.prefix!r}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._cancel_call()
        self.connected = False

    async def _read(self) -> None:
        resp = await self.client.get_prefix(self.prefix)
        # get_prefix ranges [prefix, prefix_range_end(prefix)), the same range the watch uses.
        self._view = {kv.key: kv.value for kv in resp.kvs}
        self.revision = resp.header.revision

    def _notify(self) -> None:
        try:
            self.on_change(self._view, self.revision)
        except Exception:
            log.exception("a watch consumer failed; the watch goes on",
                          extra={"fields": {"prefix": self.prefix.decode(errors="replace")}})

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            raise_if_cancelling()
            try:
                await self._stream()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling(exc)
                if self.connected:
                    log.warning("etcd watch broken; resuming from the last revision", extra={"fields": {
                        "prefix": self.prefix.decode(errors="replace"), "revision": self.revision,
                        "error": type(exc).__name__}})
                else:
                    log.debug("etcd watch not open: %s", type(exc).__name__)
                if self.connected:
                    delay = BACKOFF_MIN  # a stream that was up: retry quickly first
            finally:
                self.connected = False
                self._cancel_call()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stream(self) -> None:
        """One watch stream, from ``revision + 1`` until it breaks (raises) or etcd ends it."""
        client = self.client
        await asyncio.wait_for(client.connect(), self.timeout)
        call = self._call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        create = rpc.WatchCreateRequest(key=self.prefix, range_end=self.range_end,
                                        start_revision=self.revision + 1)
        await asyncio.wait_for(call.write(rpc.WatchRequest(create_request=create)), self.timeout)
        first = await asyncio.wait_for(call.read(), self.timeout)
        if first is _EOF or not first.created:
            raise ConnectionError("etcd did not create the watch")
        if first.compact_revision:
            await self._reread(first.compact_revision)
            return  # watch again from the re-read's revision
        self.connected = True
        log.debug("etcd watch open", extra={"fields": {"prefix": self.prefix.decode(errors="replace"),
                                                       "revision": self.revision}})
        resp = first
        while True:
            if resp.events:
                self._apply(resp.events)
            if resp.compact_revision:
                await self._reread(resp.compact_revision)
                return
            if resp.canceled:
                raise ConnectionError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
            resp = await call.read()
            if resp is _EOF:
                raise ConnectionError("etcd ended the watch stream")

    def _apply(self, events: Any) -> None:
        view = self._view
        rev = self.revision
        for ev in events:
            kv = ev.kv
            if kv.mod_revision <= self.revision:
                continue  # already in the view (replayed after a resume that raced a read)
            if ev.type == _DELETE:
                view.pop(kv.key, None)
            else:
                view[kv.key] = kv.value
            rev = max(rev, kv.mod_revision)
        if rev != self.revision:
            self.revision = rev
            self._notify()

    async def _reread(self, compacted: int) -> None:
        log.warning("etcd compacted past the watch's revision; reading the prefix again", extra={"fields": {
            "prefix": self.prefix.decode(errors="replace"), "revision": self.revision, "compacted": compacted}})
        self._cancel_call()
        await asyncio.wait_for(self._read(), self.timeout)
        self.rereads += 1
        self._notify()

    def _cancel_call(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

