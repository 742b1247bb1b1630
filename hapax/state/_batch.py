"""Coalesce many requests' Redis work into one write per event-loop iteration.

One awaited redis-py call costs ~120 µs of client CPU; the same call inside a
pipeline of 32 costs ~25 µs (/work/shared/notes/redis-client-cost.md). So
operations are not sent one by one: ``submit`` queues an operation for one of the
scripts and the queue goes out at the end of the loop iteration, every script's
operations packed (msgpack) into one ``EVALSHA`` each, all in one write, one
round trip, on one kept connection. While a batch is on the wire the next one
gathers; it leaves the moment the first returns, so batches grow with load and an
idle node pays one round trip.

The kept connection is redis-py's (from the client's pool, connected and
authenticated by it), but once held its transport is read by ``_Wire``, a
protocol that feeds a hiredis reader and hands the batch its replies from the
loop's own callback: no task, stream reader or timeout context per round trip,
which at one request in flight were most of a round trip's CPU.

Scripts are loaded once (``SCRIPT LOAD``) and called by SHA; a ``NOSCRIPT`` reply
(a restarted or flushed Redis) loads them again and resends that batch once.
Every round trip is bounded by ``timeout``; past it, or on any connection error
or error reply, every operation of the batch fails with ``RedisUnavailable``. One
watchdog timer keeps that bound for every round trip in turn (re-armed for the
batch on the wire when it fires), rather than a timer started and cancelled per
round trip, which on uvloop cost more than the rest of the batch's bookkeeping.
Each round trip that gets its replies is reported to ``on_round_trip`` (seconds
from the write to the last reply), which the node makes a histogram of.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import hiredis
import msgpack
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, NoScriptError, RedisError

from ._base import StateUnavailable

#: ``CLIENT REPLY SKIP``: Redis sends no reply for it nor for the command after it.
_SKIP = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"

_Op: TypeAlias = tuple[Any, "asyncio.Future[Any]", Callable[[BaseException], None] | None]
#: A round trip's operations: per script that has any, in script order (one reply each).
_Batch: TypeAlias = list[list[_Op]]


class RedisUnavailable(StateUnavailable):
    """Redis did not answer in time, or refused; shared routing state falls back to local."""


def _unavailable(exc: BaseException) -> RedisUnavailable:
    if isinstance(exc, RedisUnavailable):
        return exc
    return RedisUnavailable(f"redis: {type(exc).__name__}: {exc}" if str(exc) else f"redis: {type(exc).__name__}")


class _Wire(asyncio.Protocol):
    """A held connection's transport: writes of whole batches, their replies parsed as they arrive.

    One batch at a time is on the wire; ``on_replies`` gets its ``n`` replies (an
    error reply as its exception object, so the stream stays in step), ``on_lost``
    the reason the connection ended. Connection events are passed on to the
    protocol redis-py set up, so its connection object closes cleanly afterwards.
    """

    def __init__(
        self, conn: AbstractConnection, on_replies: Callable[[list[Any]], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        writer = conn._writer
        assert writer is not None
        self.conn = conn
        self.transport = writer.transport
        self._prior = self.transport.get_protocol()
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self._want = 0
        self._replies: list[Any] = []
        self._on_replies = on_replies
        self._on_lost = on_lost
        self.lost = False
        self.transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def send(self, chunks: list[bytes], n: int) -> None:
        self._want, self._replies = n, []
        self.transport.writelines(chunks)

    def write(self, chunks: list[bytes]) -> None:
        """Commands whose replies Redis will not send (``CLIENT REPLY SKIP``): nothing to wait for."""
        self.transport.writelines(chunks)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                r = self._reader.gets(False)
            except InvalidResponse as exc:  # the stream cannot be trusted after this
                self._fail(exc)
                return
            if r is False:
                return
            if not self._want:  # nothing asked for it: out of step
                self._fail(InvalidResponse("redis: a reply nobody asked for"))
                return
            self._replies.append(r)
            if len(self._replies) == self._want:
                replies, self._want, self._replies = self._replies, 0, []
                self._on_replies(replies)

    def eof_received(self) -> bool:
        self._fail(ConnectionError("redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("redis connection lost"))
        self._prior.connection_lost(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.lost:
            return
        self.lost = True
        self.transport.close()
        self._on_lost(exc)

    def close(self) -> None:
        self.lost = True
        self.transport.close()


class Batcher:
    def __init__(self, client: Redis, scripts: Sequence[str] = (), *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        # One packer kept, not one made per call (msgpack.packb's way): a batcher lives on one loop.
        # Lua's cmsgpack knows no bin type: bytes (a dedup result) go as raw strings, as Lua holds them.
        self._pack = msgpack.Packer(use_bin_type=False).pack
        self._sources: list[bytes] = []
        # Per script, the RESP of ``EVALSHA <sha> 0`` up to its one argument.
        self._heads: list[bytes] = []
        # Whether the kept connection has shown Redis knows our scripts (a reply without NOSCRIPT):
        # only then may a script's reply be skipped, since a skipped NOSCRIPT would go unseen.
        self._verified = False
        self._pending: _Batch = []
        self._scheduled = False
        self._sending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._wire: _Wire | None = None
        # The batch on the wire, what was written for it, whether its scripts were reloaded, its deadline.
        self._batch: _Batch = []
        self._chunks: list[bytes] = []
        self._count = 0
        self._reloaded = False
        #: The watchdog (``_watch``), armed while a round trip may be on the wire.
        self._timer: asyncio.TimerHandle | None = None
        self._sent_at = 0.0
        self._quiet: asyncio.Future[None] | None = None
        #: Round trips and operations sent (the node's ``hapax_redis_operations_total``).
        self.round_trips = 0
        self.operations = 0
        #: Told each answered round trip's seconds, write to last reply (reloads and resends included).
        self.on_round_trip: Callable[[float], None] | None = None
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

        Work nobody waits on (given ``on_error``: settlements, releases, renewals) has no reply
        to read, so once the kept connection has answered a call of ours it is written after
        ``CLIENT REPLY SKIP``, its own ``EVALSHA`` ahead of the script's other operations: Redis
        sends nothing back for it, it does not wait for a batch on the wire, and a batch of
        nothing else makes no round trip. Its future then resolves to ``None`` once written; a
        failure is no longer seen (a connection lost before Redis read it, a ``SCRIPT FLUSH`` in
        between), which costs what a failed settlement always did: the leases it would have ended
        expire, a token correction is lost.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[script].append((op, fut, on_error))
        # While a batch is on the wire the next one gathers, except what needs no reply.
        if not self._scheduled and (not self._sending or (self._verified and on_error is not None)):
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    # -- one round trip ----------------------------------------------------------------------

    def _flush(self) -> None:
        self._scheduled = False
        wire = self._wire
        skip = self._verified and wire is not None and wire.usable
        sending = self._sending
        if sending and not skip:
            return
        pending = self._pending
        silent: list[bytes] = []
        chunks: list[bytes] = []
        batch: _Batch = []
        for i, ops in enumerate(pending):
            if not ops:
                continue
            if skip:
                quiet = [o for o in ops if o[2] is not None]
                if quiet:
                    silent.append(_SKIP)
                    silent += self._command(i, quiet)
                    for _, fut, _ in quiet:
                        if not fut.done():
                            fut.set_result(None)
                    if len(quiet) == len(ops):
                        pending[i] = []
                        continue
                    ops = [o for o in ops if o[2] is None]
            if sending:  # waits for the batch on the wire
                pending[i] = ops
                continue
            pending[i] = []
            chunks += self._command(i, ops)
            batch.append(ops)
        if not batch:
            if silent:
                assert wire is not None
                wire.write(silent)
            return
        self._sending = True
        self._batch, self._reloaded = batch, False
        self._chunks, self._count = chunks, len(batch)
        self.round_trips += 1
        loop = asyncio.get_running_loop()
        self._sent_at = now = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(now + self._timeout, self._watch)
        if wire is not None and wire.usable:
            # What needs no reply goes first: a settlement reaches Redis before a later reservation.
            wire.send(silent + chunks if silent else chunks, len(batch))
        else:
            # Redis may have closed the kept connection while it was idle: a new one before
            # the write, never a resend after it (a batch Redis ran must not run twice).
            self._spawn(self._connect_and_send())

    def _command(self, script: int, ops: list[_Op]) -> tuple[bytes, ...]:
        """``EVALSHA`` of ``script`` over ``ops``, as RESP."""
        packed = self._pack([op for op, _, _ in ops])
        self.operations += len(ops)
        return self._heads[script], b"$%d\r\n" % len(packed), packed, b"\r\n"

    async def _connect_and_send(self) -> None:
        batch = self._batch
        try:
            self._drop()
            conn: AbstractConnection = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            self._fail(batch, exc)
            return
        if self._batch is not batch or not self._sending:  # timed out meanwhile
            await self._client.connection_pool.release(conn)
            return
        self._wire = _Wire(conn, self._on_replies, self._on_lost)
        self._wire.send(self._chunks, self._count)

    def _on_replies(self, replies: list[Any]) -> None:
        first: BaseException | None = None
        noscript = False
        for r in replies:
            if isinstance(r, BaseException):
                first = first or r
                noscript = noscript or isinstance(r, NoScriptError)
        if noscript:
            self._verified = False
            if not self._reloaded:
                # Redis lost its script cache (restart, SCRIPT FLUSH): load and send again, once.
                self._reloaded = True
                self._spawn(self._reload_and_send())
                return
        else:
            self._verified = True
        batch = self._batch
        if self.on_round_trip is not None:
            self.on_round_trip(asyncio.get_running_loop().time() - self._sent_at)
        if first is not None:
            self._fail(batch, first, drop=False)  # an error reply: the stream is still in step
            return
        self._end()
        for ops, reply in zip(batch, replies, strict=True):
            results = msgpack.unpackb(reply, use_list=True, raw=False)
            for (_, fut, _), res in zip(ops, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
        self._next()

    async def _reload_and_send(self) -> None:
        batch = self._batch
        try:
            for src in self._sources:
                await self._client.script_load(src)
        except (RedisError, OSError) as exc:
            self._fail(batch, exc)
            return
        wire = self._wire
        if self._batch is not batch or not self._sending:  # timed out meanwhile
            return
        if wire is None or not wire.usable:
            self._fail(batch, ConnectionError("redis connection lost"))
            return
        wire.send(self._chunks, self._count)

    def _on_lost(self, exc: BaseException) -> None:
        if self._sending:
            self._fail(self._batch, exc)

    def _watch(self) -> None:
        """The watchdog: fail the batch on the wire once it is ``timeout`` old, else wait for that."""
        self._timer = None
        if not self._sending:
            return  # idle: the next round trip arms it again
        loop = asyncio.get_running_loop()
        deadline = self._sent_at + self._timeout
        if loop.time() >= deadline:
            self._fail(self._batch, TimeoutError())
        else:
            self._timer = loop.call_at(deadline, self._watch)

    def _fail(self, batch: _Batch, exc: BaseException, *, drop: bool = True) -> None:
        if batch is not self._batch or not self._sending:
            return
        if drop:
            self._drop()  # a timeout, a reset: the stream is out of step; never reuse it
        self._end()
        err = _unavailable(exc)
        for ops in batch:
            for _, fut, on_error in ops:
                if fut.done():
                    continue
                if on_error is None:
                    fut.set_exception(err)
                else:
                    on_error(err)
                    fut.set_result(None)
        self._next()

    def _end(self) -> None:
        # The watchdog stays armed: it finds the next batch, or nothing, when it fires.
        self._batch, self._chunks, self._sending = [], [], False

    def _next(self) -> None:
        if any(self._pending):
            self._flush()
        elif self._quiet is not None and not self._quiet.done():
            self._quiet.set_result(None)

    def _drop(self) -> None:
        self._verified = False
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
            self._spawn(self._give_back(wire.conn))

    async def _give_back(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect()
        finally:
            await self._client.connection_pool.release(conn)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life --------------------------------------------------------------------------------

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
                while self._sending or any(self._pending):
                    self._quiet = asyncio.get_running_loop().create_future()
                    await self._quiet
        except TimeoutError:
            pass
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Send what is queued (settlements of the last calls), then close the kept connection."""
        await self.drain()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
