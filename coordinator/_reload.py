"""``hapax cluster reload``: one etcd key every node watches; a bump makes each re-read its mounts.

Theory of operation: ``request_reload`` puts a small JSON record (an id, who,
when) at ``/hapax/<cluster>/reload``. Every node follows that key with a
``PrefixWatch`` (resume after a disconnect, re-read after a compaction): the
value the first read finds is history, not a request; each later value that
differs from the one seen last is a request, and ``on_reload`` runs for it.
Requests that come while a reload runs are folded into one more run after it
(a reload re-reads everything, so two in a row would read the same). A bump
made while a node was cut off from etcd reaches it when the watch is back. A
node that starts while etcd is unreachable keeps trying to read the key in the
background; what was bumped before that read is history to it (it read
everything at start anyway).

What a reload does is the node's (``node.server.Node.reload``): provider
credential files, CA bundles and the config source are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aetcd
import orjson

from ._keys import reload_key
from ._watch import PrefixWatch

log = logging.getLogger("hapax.cluster")

#: Seconds between attempts to read the key when etcd did not answer at start.
RETRY_START: Final = 1.0

_FAILURES: Final[tuple[type[BaseException], ...]] = (aetcd.ClientError, OSError, TimeoutError)


async def request_reload(client: aetcd.Client, *, cluster: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """Bump the reload key; the etcd revision of the bump and the record written."""
    record = {
        "id": "rld_" + secrets.token_hex(8),
        "requested_at": time.time(),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    async with asyncio.timeout(timeout):
        resp = await client.put(reload_key(cluster), orjson.dumps(record))
    return resp.header.revision, record


class ReloadWatch:
    """Calls ``on_reload(record, revision)`` for each bump of the cluster's reload key."""

    def __init__(
        self,
        client: aetcd.Client,
        *,
        cluster: str,
        timeout: float,
        on_reload: Callable[[dict[str, Any], int], Awaitable[None]],
    ) -> None:
        self.client = client
        self.key = reload_key(cluster)
        self.timeout = timeout
        self.on_reload = on_reload
        self._watch: PrefixWatch | None = None
        #: The key's value seen last (``None``: absent); ``_seen`` is false until the first read.
        self._last: bytes | None = None
        self._seen = False
        #: The request to run next: (value, revision), or ``None``.
        self._wanted: tuple[bytes, int] | None = None
        self._running: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Never raises: with etcd unreachable it keeps trying in the background."""
        self._starting = asyncio.create_task(self._start(), name="cluster-reload-watch")

    async def _start(self) -> None:
        while True:
            # The key is not a prefix ending in "/"; only its own value is looked at below.
            watch = PrefixWatch(self.client, self.key, on_change=self._on_view, timeout=self.timeout)
            try:
                await watch.start()
            except _FAILURES as exc:
                log.debug("reload watch: etcd unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_START)
                continue
            self._watch = watch
            return

    async def close(self) -> None:
        for task in (self._starting, self._running):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._watch is not None:
            await self._watch.close()

    def _on_view(self, view: Mapping[bytes, bytes], revision: int) -> None:
        value = view.get(self.key)
        if not self._seen:
            self._seen, self._last = True, value
            return
        if value is None or value == self._last:
            return
        self._last = value
        self._wanted = (value, revision)
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._run(), name="cluster-reload")

    async def _run(self) -> None:
        while self._wanted is not None:
            (raw, revision), self._wanted = self._wanted, None
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = {}
            try:
                await self.on_reload(record if isinstance(record, dict) else {}, revision)
            except Exception:  # a reload that failed must not end the watch
                log.exception("cluster reload failed")
