"""Run an aiohttp app on a loopback port in a background thread.

Tests drive the gateway (a real subprocess) with the official SDKs; the
upstream it calls runs here, so a test can both script the upstream's
behaviour and inspect exactly what the gateway sent it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    """One request the upstream received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class UpstreamState:
    """Shared between the test and the upstream's handlers."""

    seen: list[Seen] = field(default_factory=list)
    #: Scripted faults, consumed in order: each is a dict the app interprets.
    faults: list[dict[str, Any]] = field(default_factory=list)
    reply: str = "Hello from upstream!"
    #: Requests whose client (the gateway) hung up while the upstream was still working.
    disconnects: int = 0

    #: Set by a test to end every ``{"hold": N}`` fault now.
    release: threading.Event = field(default_factory=threading.Event)

    #: A fault for every request once ``faults`` runs out (a persistently broken upstream).
    always: dict[str, Any] | None = None

    def next_fault(self) -> dict[str, Any] | None:
        return self.faults.pop(0) if self.faults else self.always


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class UpstreamServer:
    def __init__(self, app: web.Application, *, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UpstreamServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        # Handlers still sleeping in a scripted hang end here, not as "destroyed pending" noise.
        asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
