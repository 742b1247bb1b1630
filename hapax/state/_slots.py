"""Concurrency slots and the priority queue in front of them: the seam and its memory backend.

Theory of operation: a *slot* is one call in flight, counted against named
limits: ``*`` (the node), ``model:<name>`` and ``dep:<provider/model>``. A
request asks for one of several *alternatives*, each a tuple of limit names,
in preference order, and is granted the first alternative whose every limit
has room. A request first takes ``("*", "model:<name>")``; then, per attempt,
one deployment slot, the alternatives being the healthy deployments in the
strategy's order, so a full deployment is skipped rather than waited on while
another has room.

``SlotTable`` is the pure core. When nothing fits, the request joins a queue
ordered by ``(priority, arrival)`` (0 most urgent; FIFO within a priority),
bounded by ``queue_size``. Every ``release`` grants queued requests in that
order, skipping any still blocked by one of their own limits, so a request
waiting on a full model never blocks one for another model. Invariant: after
every call no queued request could be granted; so a newcomer that finds room
may take it without jumping anyone who could have used it.

``SlotGate`` is the async adapter: it parks a queued request on a future,
bounded by the queue timeout. A request that leaves (timeout, or the client
hung up and aiohttp cancelled the handler) is taken out of the queue at once.
Each waiting request has its own timer (``asyncio.timeout``); aiohttp already
arms one per request, so one more while queued is not worth a shared wheel.

The seam is ``Slots`` (``configure``, ``acquire`` → ``Slot``, ``Slot.release``):
``SlotGate`` is its memory backend, one process's table; ``RedisSlots``
(``_slots_redis``) keeps the table in Redis with the same grant rule in Lua, so
every node and worker of a cluster shares one set of slots and one queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._errors import HapaxError, RateLimited, ServiceUnavailable

GLOBAL = "*"

Alternatives = Sequence[tuple[str, ...]]


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    alternatives: Alternatives = field(compare=False)
    granted: int | None = field(default=None, compare=False)
    gone: bool = field(default=False, compare=False)


class QueueFull(Exception):
    pass


class SlotTable:
    def __init__(self, *, queue_size: int) -> None:
        self.queue_size = queue_size
        self._limits: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._heap: list[_Waiter] = []
        self._waiting = 0
        self._seq = itertools.count()

    # -- config ---------------------------------------------------------------------

    def set_limit(self, key: str, limit: int | None) -> list[_Waiter]:
        """Set or lift (``None``) a limit; returns waiters a raised limit lets in."""
        if limit is None:
            self._limits.pop(key, None)
        else:
            self._limits[key] = limit
        return self._grant()

    def limits(self) -> dict[str, int]:
        return dict(self._limits)

    # -- queries --------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._waiting

    def used(self, key: str) -> int:
        return self._used.get(key, 0)

    def has_room(self, keys: tuple[str, ...]) -> bool:
        for k in keys:
            limit = self._limits.get(k)
            if limit is not None and self._used.get(k, 0) >= limit:
                return False
        return True

    # -- inputs ---------------------------------------------------------------------

    def try_acquire(self, alternatives: Alternatives) -> int | None:
        """Take the first alternative with room now; its index, or ``None``."""
        for i, keys in enumerate(alternatives):
            if self.has_room(keys):
                self._take(keys)
                return i
        return None

    def enqueue(self, alternatives: Alternatives, *, priority: int) -> _Waiter:
        """Queue a request that found no room; raise ``QueueFull`` when it cannot wait."""
        if self._waiting >= self.queue_size:
            raise QueueFull
        w = _Waiter(priority, next(self._seq), alternatives)
        heapq.heappush(self._heap, w)
        self._waiting += 1
        return w

    def cancel(self, w: _Waiter) -> None:
        """Take a waiter out (it gave up); a slot it was granted meanwhile is released."""
        if w.gone:
            return
        w.gone = True
        if w.granted is None:
            self._waiting -= 1
        # The heap entry is dropped lazily when it reaches the top.

    def release(self, keys: tuple[str, ...]) -> list[_Waiter]:
        """Give back a slot; returns the waiters granted as a result."""
        for k in keys:
            n = self._used.get(k, 0) - 1
            if n > 0:
                self._used[k] = n
            else:
                self._used.pop(k, None)
        return self._grant()

    # -- internals ------------------------------------------------------------------

    def _take(self, keys: tuple[str, ...]) -> None:
        for k in keys:
            self._used[k] = self._used.get(k, 0) + 1

    def _grant(self) -> list[_Waiter]:
        granted: list[_Waiter] = []
        if not self._waiting:
            return granted
        kept: list[_Waiter] = []
        while self._heap:
            w = heapq.heappop(self._heap)
            if w.gone:
                continue
            i = self.try_acquire(w.alternatives)
            if i is None:
                kept.append(w)
                continue
            w.granted = i
            self._waiting -= 1
            granted.append(w)
        for w in kept:
            heapq.heappush(self._heap, w)
        return granted


@dataclass(slots=True)
class Slot:
    """A granted slot; ``release`` is idempotent, and committed when called (never awaited)."""

    gate: Slots
    keys: tuple[str, ...]
    index: int
    waited: float
    released: bool = False
    #: The backend's own handle (a shared backend's lease id).
    handle: object = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._give_back(self)


Overloaded = Callable[[str, float], HapaxError]


class Slots(ABC):
    """Concurrency slots and the priority queue: one backend per process, built by ``node``."""

    #: memory or redis, for logs.
    name = "memory"
    on_wait: Callable[[float], None] | None = None
    on_reject: Callable[[str], None] | None = None

    def attach(
        self, *, on_wait: Callable[[float], None] | None, on_reject: Callable[[str], None] | None
    ) -> None:
        """Report waits (seconds, 0 for an immediate grant) and rejections (queue_full, queue_timeout)."""
        self.on_wait, self.on_reject = on_wait, on_reject

    @abstractmethod
    def configure(self, *, queue_size: int, limits: dict[str, int]) -> None:
        """Follow a new config: the queue bound and every limit (a key absent is unlimited)."""

    @abstractmethod
    async def acquire(
        self, alternatives: Alternatives, *, priority: int, timeout: float, overloaded: Overloaded
    ) -> Slot:
        """A slot for the first of ``alternatives`` with room, or a wait in line up to ``timeout``.

        ``overloaded(reason, retry_after)`` builds the error for a full queue
        (``queue_full``) or a wait that ran out (``queue_timeout``).
        """

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests of this process waiting in the queue now (the queue-depth gauge)."""

    @abstractmethod
    def _give_back(self, slot: Slot) -> None:
        """End ``slot``; called once, by ``Slot.release``."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (lease renewal, wake-ups); call once the event loop runs."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and close connections."""


class SlotGate(Slots):
    def __init__(
        self,
        *,
        queue_size: int,
        on_wait: Callable[[float], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = SlotTable(queue_size=queue_size)
        self._futures: dict[int, asyncio.Future[None]] = {}
        self.on_wait = on_wait
        self.on_reject = on_reject
        self._clock = clock

    @property
    def waiting(self) -> int:
        return self.table.waiting

    def configure(self, *, queue_size: int, limits: dict[str, int]) -> None:
        self.table.queue_size = queue_size
        for key in set(self.table.limits()) - set(limits):
            self._wake(self.table.set_limit(key, None))
        for key, limit in limits.items():
            self._wake(self.table.set_limit(key, limit))

    async def acquire(
        self,
        alternatives: Alternatives,
        *,
        priority: int,
        timeout: float,
        overloaded: Overloaded,
    ) -> Slot:
        i = self.table.try_acquire(alternatives)
        if i is not None:
            return Slot(self, tuple(alternatives[i]), i, 0.0)
        try:
            w = self.table.enqueue(alternatives, priority=priority)
        except QueueFull:
            if self.on_reject:
                self.on_reject("queue_full")
            raise overloaded("queue_full", timeout) from None
        fut = asyncio.get_running_loop().create_future()
        self._futures[w.seq] = fut
        t0 = self._clock()
        done = False
        try:
            async with asyncio.timeout(timeout):
                await fut
            done = True
        except TimeoutError:
            if self.on_reject:
                self.on_reject("queue_timeout")
            raise overloaded("queue_timeout", timeout) from None
        finally:
            self._futures.pop(w.seq, None)
            if not done:
                if w.granted is None:
                    self.table.cancel(w)
                else:
                    # Granted in the same tick it gave up: hand the slot on.
                    w.gone = True
                    self._release(tuple(w.alternatives[w.granted]))
        waited = self._clock() - t0
        if self.on_wait:
            self.on_wait(waited)
        assert w.granted is not None
        return Slot(self, tuple(w.alternatives[w.granted]), w.granted, waited)

    def record_immediate(self) -> None:
        if self.on_wait:
            self.on_wait(0.0)

    def _give_back(self, slot: Slot) -> None:
        self._release(slot.keys)

    def _release(self, keys: tuple[str, ...]) -> None:
        self._wake(self.table.release(keys))

    def _wake(self, granted: list[_Waiter]) -> None:
        for w in granted:
            fut = self._futures.get(w.seq)
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif w.granted is not None:
                # Its owner is gone (it left between grant and wake-up): free the slot again.
                w.gone = True
                self._wake(self.table.release(tuple(w.alternatives[w.granted])))


def overload_error(status: int) -> Callable[[str, float], HapaxError]:
    """The error a rejected request gets: 429 or 503, with Retry-After, code naming why."""

    def make(reason: str, retry_after: float) -> HapaxError:
        cls = RateLimited if status == 429 else ServiceUnavailable
        wait = max(1.0, retry_after)
        if reason == "queue_full":
            return cls("the gateway is at capacity and its queue is full; retry later",
                       code="queue_full", retry_after=wait)
        return cls(f"waited {retry_after:g}s in the gateway's queue without getting a slot; retry later",
                   code="queue_timeout", retry_after=wait)

    return make
