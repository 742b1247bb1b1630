"""Coalesce many requests' Redis work into one pipeline per event-loop iteration.

One awaited redis-py call costs ~120 µs of client CPU; the same call inside a
pipeline of 32 costs ~25 µs (/work/shared/notes/redis-client-cost.md). So
operations are not sent one by one: ``submit`` queues an operation for one of the
scripts and the queue goes out at the end of the loop iteration, every script's
operations packed (msgpack) into one ``EVALSHA`` each, all in one pipeline, one
round trip, written on one kept connection. While a batch is on the wire the next one gathers; it leaves the
moment the first returns, so batches grow with load and an idle node pays one
round trip.

Scripts are loaded once (``SCRIPT LOAD``) and called by SHA; a ``NOSCRIPT`` reply
(a restarted or flushed Redis) loads them again and resends that batch once.
Every round trip is bounded by ``timeout``; past it, or on any connection error,
every operation of the batch fails with ``StateUnavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import msgpack
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ._base import StateUnavailable

_Op: TypeAlias = tuple[Any, "asyncio.Future[Any]", Callable[[BaseException], None] | None]


class Batcher:
    def __init__(self, client: Redis, scripts: Sequence[str], *, timeout: float) -> None:
        self._client = client
        self._sources = [s.encode() for s in scripts]
        self._shas = [hashlib.sha1(s).hexdigest() for s in self._sources]
        self._timeout = timeout
        self._pending: list[list[_Op]] = [[] for _ in scripts]
        self._scheduled = False
        self._sending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn: AbstractConnection | None = None
        #: Round trips and operations sent, for the benchmark's figures.
        self.round_trips = 0
        self.operations = 0

    def submit(
        self, script: int, op: Any, *, on_error: Callable[[BaseException], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``op`` for ``script``; the future gets its result.

        On failure the future raises ``StateUnavailable``; or, given ``on_error``, that
        is called instead and the future resolves to ``None`` (work nobody waits on).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[script].append((op, fut, on_error))
        if not self._scheduled and not self._sending:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if self._sending or not any(self._pending):
            return
        batch = self._pending
        self._pending = [[] for _ in batch]
        self._sending = True
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[list[_Op]]) -> None:
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    replies = await self._round_trip(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                err = StateUnavailable(f"redis: {type(exc).__name__}: {exc}" if str(exc) else
                                       f"redis: {type(exc).__name__}")
                for ops in batch:
                    for _, fut, on_error in ops:
                        if fut.done():
                            continue
                        if on_error is None:
                            fut.set_exception(err)
                        else:
                            on_error(err)
                            fut.set_result(None)
                return
            for ops, reply in zip((o for o in batch if o), replies, strict=True):
                results = msgpack.unpackb(reply, use_list=True, raw=False)
                for (_, fut, _), res in zip(ops, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self._sending = False
            if any(self._pending):
                self._flush()

    async def _round_trip(self, batch: list[list[_Op]]) -> list[bytes]:
        args = [(i, msgpack.packb([op for op, _, _ in ops])) for i, ops in enumerate(batch) if ops]
        self.round_trips += 1
        self.operations += sum(len(ops) for ops in batch)
        replies = await self._evalsha(args)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (restart, SCRIPT FLUSH): load and send again, once.
            for src in self._sources:
                await self._client.script_load(src)
            replies = await self._evalsha(args)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies

    async def _evalsha(self, args: list[tuple[int, bytes]]) -> list[Any]:
        """One write of every ``EVALSHA``, then their replies, on a connection kept for it.

        redis-py's connection layer rather than its pipeline object: measured on this
        machine, a one-command round trip costs ~165 µs of CPU this way against ~285 µs
        through ``pipeline().execute()``, and a quiet node sends mostly one-op batches.
        The caller's ``asyncio.timeout`` bounds the whole exchange.
        """
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(
                conn.pack_commands([("EVALSHA", self._shas[i], 0, packed) for i, packed in args]),
                check_health=False,
            )
            replies: list[Any] = []
            for _ in args:
                try:
                    replies.append(await conn.read_response(disable_decoding=True, timeout=math.inf))
                except ResponseError as exc:  # an error reply: the connection is still in step
                    replies.append(exc)
            return replies
        except BaseException:
            # Anything else (a timeout, a reset, a cancel) leaves the stream out of step.
            self._conn = None
            await conn.disconnect()
            await self._client.connection_pool.release(conn)
            raise

    async def load(self) -> None:
        """Load the scripts now, so the first requests do not pay for it."""
        async with asyncio.timeout(self._timeout * 4):
            for src in self._sources:
                await self._client.script_load(src)

    async def aclose(self) -> None:
        """Send what is queued (settlements of the last calls), then stop; bounded by the timeout."""
        self._flush()
        try:
            async with asyncio.timeout(self._timeout * 4):
                while self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        except TimeoutError:
            pass
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._client.connection_pool.release(conn)
