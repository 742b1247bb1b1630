"""One pub/sub connection per process: how other processes wake this one.

Theory of operation: each shared routing seam names the channels it listens on
before ``start`` (a per-process channel for grants and results addressed to it,
a cluster-wide one for health news); the bus subscribes to all of them on one
connection of its own (a subscribed connection can issue nothing else) and calls
each channel's handler with the message's bytes, on the event loop, in order.

Pub/sub delivers at most once: a message sent while the connection is down is
lost. So after every (re)connect the bus calls its ``on_connect`` hooks, and each
seam reconciles then (asks Redis for grants it may have missed), instead of
trusting the channel alone. A lost connection is retried every
``RECONNECT_DELAY`` seconds; reconnecting is the only loop here, there is no
polling for messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("hapax.state")

#: Seconds between attempts to get the subscription back after Redis went away.
RECONNECT_DELAY = 0.5


class Bus:
    def __init__(self, client: Redis, *, timeout: float) -> None:
        #: A client of its own, without a read timeout: a quiet channel is not a dead one.
        self.client = client
        self.timeout = timeout
        self._handlers: dict[str, Callable[[bytes], None]] = {}
        self.on_connect: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Call ``handler`` with each message on ``channel``; before ``start``."""
        assert self._task is None, "channels are named before the bus starts"
        self._handlers[channel] = handler

    async def publish(self, channel: str, message: bytes) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.publish(channel, message)

    async def start(self) -> None:
        if self._task is None and self._handlers:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hapax-state-bus")
            # Wait (bounded) for the first subscription, so no wake-up sent right after
            # start-up is lost; with Redis down the node starts anyway, degraded.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout * 4):
                    await self.subscribed.wait()

    async def _run(self) -> None:
        while True:
            ps = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.timeout * 4):
                    await ps.subscribe(*self._handlers)
                self.subscribed.set()
                for hook in self.on_connect:
                    hook()
                async for msg in ps.listen():
                    if msg.get("type") != "message":
                        continue
                    channel = msg["channel"]
                    handler = self._handlers.get(channel.decode() if isinstance(channel, bytes) else channel)
                    if handler is not None:
                        try:
                            handler(msg["data"])
                        except Exception:  # one bad message must not end the subscription
                            log.exception("state bus handler failed")
            except (RedisError, OSError, TimeoutError) as exc:
                if self.subscribed.is_set():
                    log.info("state bus lost its redis connection: %s", type(exc).__name__)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await ps.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8
            await asyncio.sleep(RECONNECT_DELAY)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.client.aclose()
