"""The background work a Redis seam owns: one lease-renewal loop and short tasks it fires.

Both the slots and the dedup seam renew leases forever and fire releases they must not
await on the request path; they close the same way, so that lives here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Background:
    def __init__(self, name: str) -> None:
        self._name = name
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start_renewer(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start the renewal loop once; later calls keep the running one."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(loop(), name=self._name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` without awaiting it, held until done so it is not collected mid-way."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop renewing, then let the fired tasks finish (a release still reaches Redis)."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
