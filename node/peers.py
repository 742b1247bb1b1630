"""Sibling workers' metrics: each serves its snapshot on a private unix socket.

A scrape of ``GET /metrics`` lands on one worker (the kernel picks it among the
``SO_REUSEPORT`` sockets). That worker asks every sibling for a snapshot of its
values over ``<runtime dir>/worker-<index>.sock`` (the supervisor's 0700 directory,
so no other user can connect), waits at most ``PEER_TIMEOUT`` for each, and merges
what came into the node's totals. A sibling that is restarting simply does not
answer; ``hapax_worker_info`` then lists one worker fewer than ``hapax_workers``.

The exchange is as small as it gets: connect, the sibling writes one JSON
document (orjson) and closes. Nothing of it runs on a request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import orjson

log = logging.getLogger("hapax.node")

#: Seconds a scrape waits for each sibling; a sibling slower than this is left out of that scrape.
PEER_TIMEOUT: Final = 1.0
#: Largest snapshot read from a sibling (thousands of series are a few hundred KiB).
MAX_SNAPSHOT_BYTES: Final = 64 * 1024 * 1024


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


class PeerServer:
    """Answers sibling workers with ``snapshot()``: this worker's values, JSON-encoded."""

    def __init__(self, run_dir: Path, index: int, snapshot: Callable[[], Awaitable[bytes]]) -> None:
        self.path = socket_path(run_dir, index)
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A worker killed before it could clean up left its socket file: take the name over.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await self._snapshot())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def gather(run_dir: Path, count: int, me: int) -> list[dict[str, Any]]:
    """Snapshots of every sibling that answers within ``PEER_TIMEOUT``."""
    results = await asyncio.gather(*(_fetch(socket_path(run_dir, i)) for i in range(count) if i != me))
    return [r for r in results if r is not None]


async def _fetch(path: Path) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(PEER_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_SNAPSHOT_BYTES)
            try:
                data = await reader.read(MAX_SNAPSHOT_BYTES)
                while chunk := await reader.read(MAX_SNAPSHOT_BYTES):
                    data += chunk
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None  # not up (restarting) or too slow: left out of this scrape
    try:
        snap = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("a sibling worker sent an unreadable metrics snapshot", extra={"fields": {"socket": str(path)}})
        return None
    return snap if isinstance(snap, dict) else None
