"""The slots seam's contract, on the memory backend and on a real Redis.

Every backend grants the first alternative with room, queues by (priority,
arrival), bounds the queue, times waiters out, and takes a waiter that leaves out
of the line at once. The Redis backend also shares one table between processes
(two backends here, each with its own connections and node id): a slot freed on
one wakes a waiter on the other, the order holds across them, and the slots of a
process that stops renewing come back within a lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from hapax._errors import HapaxError
from hapax.state import (
    GLOBAL,
    SLOTS_LUA,
    Bus,
    RedisBreaker,
    RedisSlots,
    Script,
    Slot,
    SlotGate,
    Slots,
    overload_error,
)

G = (GLOBAL,)
err = overload_error(429)
Make = Callable[..., Awaitable[Slots]]


@pytest.fixture
async def make_redis(redis_url: str) -> AsyncIterator[Make]:
    made: list[RedisSlots] = []

    async def make(*, queue_size: int = 10, limits: dict[str, int] | None = None, lease: float = 30.0,
                   url: str = redis_url, timeout: float = 0.5, policy: str = "fail_open") -> RedisSlots:
        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        bus = Bus(Redis.from_url(url, socket_connect_timeout=timeout), timeout=timeout)
        s = RedisSlots(Script(client, SLOTS_LUA, timeout=timeout), bus,
                       RedisBreaker(retry_interval=1.0, clock=time.monotonic),
                       cluster="contract", lease_seconds=lease, on_redis_failure=policy)  # type: ignore[arg-type]
        s.configure(queue_size=queue_size, limits=limits if limits is not None else {GLOBAL: 1})
        await bus.start()
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.aclose()
        await s.bus.aclose()
        await s.script.client.aclose()


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    if request.param == "redis":
        return request.getfixturevalue("make_redis")  # type: ignore[no-any-return]

    async def make_memory(*, queue_size: int = 10, limits: dict[str, int] | None = None, **_: object) -> Slots:
        g = SlotGate(queue_size=queue_size)
        g.configure(queue_size=queue_size, limits=limits if limits is not None else {GLOBAL: 1})
        return g

    return make_memory


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)  # bounded poll


async def queued(gates: list[Slots], n: int) -> None:
    await wait_until(lambda: sum(g.waiting for g in gates) == n, f"{n} waiting")


async def test_priority_then_fifo_and_each_release_wakes_the_next(make: Make) -> None:
    gate = await make()
    first = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    order: list[str] = []

    async def wait(name: str, prio: int) -> Slot:
        s = await gate.acquire([G], priority=prio, timeout=10, overloaded=err)
        order.append(name)
        return s

    tasks = []
    for i, (name, prio) in enumerate([("late-9", 9), ("a-1", 1), ("b-1", 1), ("urgent-0", 0)]):
        tasks.append(asyncio.create_task(wait(name, prio)))
        await queued([gate], i + 1)  # arrival order is the creation order
    first.release()
    for n in range(1, 5):
        await wait_until(lambda n=n: len(order) == n, f"grant {n}")
        assert gate.waiting == 4 - n
        [t] = [t for t in tasks if t.done()]
        tasks.remove(t)
        t.result().release()
    assert order == ["urgent-0", "a-1", "b-1", "late-9"]


async def test_the_queue_is_bounded_and_waits_time_out(make: Make) -> None:
    gate = await make(queue_size=1)
    held = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    waiter = asyncio.create_task(gate.acquire([G], priority=5, timeout=0.3, overloaded=err))
    await queued([gate], 1)
    with pytest.raises(HapaxError) as full:
        await gate.acquire([G], priority=0, timeout=1, overloaded=err)
    assert full.value.code == "queue_full" and full.value.status == 429
    with pytest.raises(HapaxError) as late:
        await waiter
    assert late.value.code == "queue_timeout"
    assert gate.waiting == 0
    held.release()
    again = await gate.acquire([G], priority=5, timeout=1, overloaded=err)  # the timed-out one holds nothing
    again.release()


async def test_a_waiter_that_leaves_holds_nothing(make: Make) -> None:
    gate = await make()
    held = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    waiter = asyncio.create_task(gate.acquire([G], priority=5, timeout=10, overloaded=err))
    await queued([gate], 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    # The slot is free for the next caller at once (nobody left in line took it).
    s = await gate.acquire([G], priority=5, timeout=5, overloaded=err)
    assert s.waited < 5
    s.release()


async def test_alternatives_take_the_first_with_room(make: Make) -> None:
    gate = await make(limits={"dep:x": 1, "dep:y": 1})
    alts = [("dep:x",), ("dep:y",)]
    a = await gate.acquire(alts, priority=5, timeout=1, overloaded=err)
    b = await gate.acquire(alts, priority=5, timeout=1, overloaded=err)
    assert (a.index, b.index) == (0, 1)
    waiter = asyncio.create_task(gate.acquire(alts, priority=5, timeout=10, overloaded=err))
    await queued([gate], 1)
    b.release()
    c = await waiter
    assert c.index == 1 and c.keys == ("dep:y",)
    # An unlimited key is never a reason to wait.
    free = await gate.acquire([("dep:z",)], priority=5, timeout=1, overloaded=err)
    assert free.index == 0
    for s in (a, c, free):
        s.release()


# -- Redis only: one table for several processes --------------------------------------------


async def test_a_release_on_one_process_wakes_a_waiter_on_another_in_priority_order(make_redis: Make) -> None:
    a, b = await make_redis(), await make_redis()
    held = await a.acquire([G], priority=5, timeout=1, overloaded=err)
    order: list[str] = []

    async def wait(gate: Slots, name: str, prio: int) -> Slot:
        s = await gate.acquire([G], priority=prio, timeout=10, overloaded=err)
        order.append(name)
        return s

    tasks = []
    for i, (gate, name, prio) in enumerate([(b, "b-5", 5), (a, "a-3", 3), (b, "b-1", 1), (a, "a-1", 1)]):
        tasks.append(asyncio.create_task(wait(gate, name, prio)))
        await queued([a, b], i + 1)
    held.release()
    for n in range(1, 5):
        await wait_until(lambda n=n: len(order) == n, f"grant {n}")
        [t] = [t for t in tasks if t.done()]
        tasks.remove(t)
        t.result().release()
    assert order == ["b-1", "a-1", "a-3", "b-5"]


async def test_slots_of_a_process_that_stops_renewing_come_back_within_the_lease(make_redis: Make) -> None:
    dead = await make_redis(lease=1.0, limits={GLOBAL: 2})
    live = await make_redis(lease=1.0, limits={GLOBAL: 2})
    for _ in range(2):
        await dead.acquire([G], priority=5, timeout=1, overloaded=err)
    assert isinstance(dead, RedisSlots)
    await dead.aclose()  # no more renewals
    dead.forget_leases()
    # The waiter is woken by the live process's renewal sweep (every third of its lease),
    # which finds the dead leases expired; the wait is bounded by the queue timeout.
    s = await live.acquire([G], priority=5, timeout=10, overloaded=err)
    assert s.waited > 0
    s.release()


async def test_redis_down_fail_open_uses_local_slots_and_fail_closed_refuses(make_redis: Make) -> None:
    dead_url = "redis://127.0.0.1:1/0"
    open_ = await make_redis(url=dead_url, timeout=0.2)
    s = await open_.acquire([G], priority=5, timeout=1, overloaded=err)  # local: 1 slot
    with pytest.raises(HapaxError) as e:
        await open_.acquire([G], priority=5, timeout=0.05, overloaded=err)
    assert e.value.code == "queue_timeout"
    s.release()
    assert isinstance(open_, RedisSlots) and open_.breaker.degraded
    closed = await make_redis(url=dead_url, timeout=0.2, policy="fail_closed")
    with pytest.raises(HapaxError) as e2:
        await closed.acquire([G], priority=5, timeout=1, overloaded=err)
    assert e2.value.code == "state_unavailable" and e2.value.status == 429


async def test_200_concurrent_acquires_against_a_limit_of_50_take_exactly_50(make: Make) -> None:
    gate = await make(queue_size=0, limits={GLOBAL: 50})

    async def one() -> Slot | str:
        try:
            return await gate.acquire([G], priority=5, timeout=1, overloaded=err)
        except HapaxError as exc:
            return exc.code

    results = await asyncio.gather(*(one() for _ in range(200)))
    slots = [r for r in results if isinstance(r, Slot)]
    assert len(slots) == 50 and results.count("queue_full") == 150
    if isinstance(gate, RedisSlots):
        # Coalesced: the operations of one loop iteration went out as one script call.
        assert gate.script.round_trips < gate.script.operations / 10
    for s in slots:
        s.release()


async def test_a_release_and_a_newcomer_together_the_queued_waiter_goes_first(make: Make) -> None:
    gate = await make()
    held = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    waiter = asyncio.create_task(gate.acquire([G], priority=0, timeout=10, overloaded=err))
    await queued([gate], 1)
    # In one loop iteration: the slot goes back and a newcomer asks (one Redis batch).
    held.release()
    newcomer = asyncio.create_task(gate.acquire([G], priority=9, timeout=10, overloaded=err))
    first = await asyncio.wait_for(waiter, 10)
    await queued([gate], 1)  # the newcomer waits: the slot was the queued waiter's
    assert not newcomer.done()
    first.release()
    (await asyncio.wait_for(newcomer, 10)).release()
