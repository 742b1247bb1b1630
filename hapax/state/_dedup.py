"""In-flight deduplication: identical concurrent requests share one upstream call.

Theory of operation: a request's *key* is a digest of who asks (the caller's
principal), the public model, the operation and the canonical body (JSON with
sorted keys), so only byte-for-byte equivalent requests from the same caller
meet. The first request with a key (the leader) makes the call itself, in its
own task: a request with no twin, nearly every request, pays only for a dict
entry and a future, not for a task of its own. Requests with the same key
that arrive before it finishes (followers) wait on the leader's future.
Everyone gets the whole result, or the same error.

If the leader's client hangs up, its call is cancelled with it; followers
still waiting then elect a new leader among themselves, which calls again.
That costs a second upstream call in a rare case, in exchange for no extra
task on every request. The entry is removed when the call finishes, so a
later identical request makes a fresh call: this is deduplication, not a cache.

Only non-streaming calls are merged: a stream is consumed once, and fanning it
out to late joiners would need buffering the gateway promises not to do.

The state contract (DESIGN §4) is ``InFlight.run``. ``RedisInFlight``
(``_dedup_redis``) merges identical requests across processes too: it elects one
leader per key in the cluster and publishes its result, encoded by the caller's
``Codec``, to the processes that wait for it.
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


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How a result crosses processes: ``encode`` it (``None``: it cannot be shared), ``decode`` it.

    ``decode`` raises ``ValueError`` when this process cannot use the result (a
    deployment its config does not name); the caller then makes the call itself.
    """

    encode: Callable[[T], bytes | None]
    decode: Callable[[bytes], T]


class InFlight(ABC):
    #: Whether ``claim`` can ask anything (a shared backend): callers skip the key otherwise.
    claims = False

    @abstractmethod
    async def run(
        self, key: str, call: Callable[[], Awaitable[T]], codec: Codec[T] | None = None
    ) -> tuple[T, bool]:
        """Run ``call`` once per key at a time; returns (result, shared with a leader?).

        A backend shared across processes uses ``codec`` to hand the result over;
        without one, it merges only within the process.
        """

    def claim(self, key: str) -> object | None:
        """Start asking the cluster who leads ``key`` now, ahead of ``run`` (``None``: nothing asked).

        So the question can share a round trip with the request's admission. ``run``
        for the key uses the answer; ``unclaim`` with the token this returns ends the
        claim if no ``run`` did (a refused request), and is a no-op after one did.
        """
        return None

    def unclaim(self, token: object | None) -> None:  # noqa: B027 - optional hook
        """End a claim ``run`` has not used: a lead it took is given up, so nobody waits on it."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (lease renewal); call once the event loop runs."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""


class _LeaderLeft(Exception):
    """The leader's caller left and took its call with it; a follower must lead."""


@dataclass(eq=False)
class _Entry:
    #: Made by the first follower: most calls never have one, so never pay for it.
    future: asyncio.Future[Any] | None = None
    followers: int = 0


class MemoryInFlight(InFlight):
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    async def run(
        self, key: str, call: Callable[[], Awaitable[T]], codec: Codec[T] | None = None
    ) -> tuple[T, bool]:
        while True:
            entry = self._entries.get(key)
            if entry is None:
                return await self._lead(key, call), False
            if entry.future is None:
                entry.future = asyncio.get_running_loop().create_future()
            entry.followers += 1
            try:
                # shield: a follower leaving must not cancel the leader's future.
                return await asyncio.shield(entry.future), True
            except _LeaderLeft:
                continue
            finally:
                entry.followers -= 1

    async def _lead(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        entry = self._entries[key] = _Entry()
        try:
            result = await call()
        except asyncio.CancelledError:
            self._finish(key, entry, exc=_LeaderLeft())
            raise
        except BaseException as exc:
            self._finish(key, entry, exc=exc)
            raise
        self._finish(key, entry, result=result)
        return result

    def _finish(self, key: str, entry: _Entry, *, result: Any = None, exc: BaseException | None = None) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
        if not entry.followers or entry.future is None:
            return  # nobody to tell; an unretrieved future exception would only be noise
        if exc is not None:
            entry.future.set_exception(exc)
        else:
            entry.future.set_result(result)
