"""Coalesce many requests' Redis work into one write per event-loop iteration.

One awaited redis-py call costs ~120 µs of client CPU; the same call inside a
pipeline of 32 costs ~25 µs (/work/shared/notes/redis-client-cost.md). So
operations are not sent one by one: ``submit`` queues an operation for one of the
scripts and the queue goes out at the end of the loop iteration, every script's
operations packed (msgpack) into one ``EVALSHA`` each, all in one write, one
round trip, on one kept connection. While a batch is on the wire the next one
gathers; it leaves the moment the first returns, so batches grow with load and an
idle node pays one round trip.

Scripts are loaded once (``SCRIPT LOAD``) and called by SHA; a ``NOSCRIPT`` reply
(a restarted or flushed Redis) loads them again and resends that batch once.
Every round trip is bounded by ``timeout``; past it, or on any connection error,
every operation of the batch fails with ``RedisUnavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import msgpack
from redis._parsers.base import AsyncBaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError

from ._base import StateUnavailable

_Op: TypeAlias = tuple[Any, "asyncio.Future[Any]", Callable[[BaseException], None] | None]

# Past this many bytes waiting in the socket's buffer, a write waits for it to drain.
_DRAIN_ABOVE = 1 << 20


class RedisUnavailable(StateUnavailable):
    """Redis did not answer in time, or refused; shared routing state falls back to local."""


class Batcher:
    def __init__(self, client: Redis, scripts: Sequence[str] = (), *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._sources: list[bytes] = []
        # Per script, the RESP of ``EVALSHA <sha> 0`` up to its one argument.
        self._heads: list[bytes] = []
        self._pending: list[list[_Op]] = []
        self._scheduled = False
        self._sending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn: AbstractConnection | None = None
        #: Round trips and operations sent, for the benchmark's figures.
        self.round_trips = 0
        self.operations = 0
        for s in scripts:
            self.add(s)

    def add(self, source: str) -> int:
        """Take operations for one more script from now on; its index for ``submit``.

        A script's operations go out after those of scripts added before it, in the same write.
        """
        src = source.encode()
        if src in self._sources:
            return self._sources.index(src)
        sha = hashlib.sha1(src).hexdigest().encode()
        self._sources.append(src)
        self._heads.append(b"*4\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha + b"\r\n$1\r\n0\r\n")
        self._pending.append([])
        return len(self._sources) - 1

    def submit(
        self, script: int, op: Any, *, on_error: Callable[[BaseException], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``op`` for ``script``; the future gets its result.

        On failure the future raises ``RedisUnavailable``; or, given ``on_error``, that
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
                err = RedisUnavailable(f"redis: {type(exc).__name__}: {exc}" if str(exc) else
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
        # Lua's cmsgpack knows no bin type: bytes (a dedup result) go as raw strings, as Lua
        # holds them; str packs the same either way.
        chunks: list[bytes] = []
        n = 0
        for i, ops in enumerate(batch):
            if ops:
                packed = msgpack.packb([op for op, _, _ in ops], use_bin_type=False)
                chunks += (self._heads[i], b"$%d\r\n" % len(packed), packed, b"\r\n")
                n += 1
                self.operations += len(ops)
        self.round_trips += 1
        replies = await self._exchange(chunks, n)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (restart, SCRIPT FLUSH): load and send again, once.
            for src in self._sources:
                await self._client.script_load(src)
            replies = await self._exchange(chunks, n)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies

    async def _exchange(self, chunks: list[bytes], n: int) -> list[Any]:
        """One write of ``n`` commands, then their ``n`` replies, on a connection kept for it.

        On the connection's own stream writer and reply parser rather than through
        ``send_packed_command``/``read_response``: those wrap each write in
        ``asyncio.wait_for`` (a task per write) and each read in a timeout and error
        bookkeeping, which at one request in flight is most of a round trip's CPU. The
        caller's ``asyncio.timeout`` bounds the whole exchange; error replies come back
        as exception objects, so the stream stays in step.
        """
        conn = self._conn
        if conn is None or not _usable(conn):
            conn = await self._reconnect()
        try:
            writer = conn._writer
            assert writer is not None
            writer.writelines(chunks)
            if writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
                await writer.drain()
            parser = cast(AsyncBaseParser, conn._parser)  # typed as the sync base; async on an async connection
            return [await parser.read_response(disable_decoding=True) for _ in range(n)]
        except BaseException:
            # A timeout, a reset, a cancel: the stream is out of step; never reuse it.
            await self._drop()
            raise

    async def _reconnect(self) -> AbstractConnection:
        await self._drop()
        # The pool hands out a connected connection, checked for stale data.
        conn: AbstractConnection = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
            await self._client.connection_pool.release(conn)

    async def load(self) -> None:
        """Load the scripts now, so the first requests do not pay for it."""
        async with asyncio.timeout(self._timeout * 4):
            for src in self._sources:
                await self._client.script_load(src)

    async def drain(self) -> None:
        """Send what is queued and wait for what is on the wire, each round trip bounded by the timeout."""
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

    async def aclose(self) -> None:
        """Send what is queued (settlements of the last calls), then give the connection back."""
        await self.drain()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._client.connection_pool.release(conn)


def _usable(conn: AbstractConnection) -> bool:
    """Whether a kept connection can take a write: Redis may have closed it while it was idle.

    Checked before writing, never by resending after: a batch Redis may have run
    (a reservation) must not run twice.
    """
    reader, writer = conn._reader, conn._writer
    if reader is None or writer is None or writer.transport.is_closing():
        return False
    return not (reader.at_eof() or reader.exception() is not None)

