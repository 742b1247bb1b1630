"""In-flight deduplication: identical concurrent requests share one upstream call.

Theory of operation: a request's *key* is a digest of who asks (the caller's
principal), the public model, the operation and the canonical body (JSON with
sorted keys), so only byte-for-byte equivalent requests from the same caller
meet. The first request with a key (the leader) starts the call as its own
task; requests with the same key that arrive before it finishes (followers)
await that same task. Everyone gets the whole result, or the same error.

The call belongs to no single caller: if the leader's client hangs up, the
call carries on for the followers; it is cancelled only when every caller has
left. The entry is removed when the call finishes, so a later identical
request makes a fresh call: this is deduplication, not a cache.

Only non-streaming calls are merged: a stream is consumed once, and fanning it
out to late joiners would need buffering the gateway promises not to do.

The state contract (DESIGN §4) is ``InFlight.run``. A Redis backend would elect
the leader with ``SET key NX PX`` and publish the result on a channel.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

T = TypeVar("T")


def dedup_key(principal: str, model: str, op: str, body: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (principal, model, op):
        h.update(part.encode())
        h.update(b"\0")
    h.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


class InFlight(ABC):
    @abstractmethod
    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``call`` once per key at a time; returns (result, shared with a leader?)."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class MemoryInFlight(InFlight):
    def __init__(self) -> None:
        self._entries: dict[str, _Entry[Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        entry = self._entries.get(key)
        shared = entry is not None
        if entry is None:
            task = asyncio.ensure_future(call())
            entry = self._entries[key] = _Entry(task)
            task.add_done_callback(self._forgetter(key, entry))
        entry.waiters += 1
        try:
            # shield: one caller leaving must not cancel the call for the others.
            return await asyncio.shield(entry.task), shared
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.task.done():
                entry.task.cancel()

    def _forgetter(self, key: str, entry: _Entry[Any]) -> Callable[[asyncio.Task[Any]], None]:
        def forget(task: asyncio.Task[Any]) -> None:
            if self._entries.get(key) is entry:
                del self._entries[key]
            if not task.cancelled():
                task.exception()  # mark retrieved: the failure reached the callers

        return forget
