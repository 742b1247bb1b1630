"""Admission: the slot table's grant order, and the async gate's waiting and leaving."""

from __future__ import annotations

import asyncio

import pytest

from hapax._errors import HapaxError
from hapax.config._reliability import HealthCheckConfig
from hapax.routing._health import ProbeStatus, ProbeTracker
from hapax.state._dedup import MemoryInFlight, dedup_key
from hapax.state._slots import GLOBAL, QueueFull, SlotGate, SlotTable, overload_error

G = (GLOBAL,)


def test_priority_then_fifo_and_bounded_queue() -> None:
    t = SlotTable(queue_size=3)
    t.set_limit(GLOBAL, 1)
    assert t.try_acquire([G]) == 0
    low = t.enqueue([G], priority=9)
    high1 = t.enqueue([G], priority=0)
    high2 = t.enqueue([G], priority=0)
    with pytest.raises(QueueFull):
        t.enqueue([G], priority=0)
    order = []
    for _ in range(3):
        [w] = t.release(G)
        order.append(w)
    assert order == [high1, high2, low]
    assert t.waiting == 0 and t.used(GLOBAL) == 1


def test_a_waiter_blocked_on_its_own_model_does_not_block_others() -> None:
    t = SlotTable(queue_size=10)
    t.set_limit(GLOBAL, 2)
    t.set_limit("model:a", 1)
    assert t.try_acquire([(GLOBAL, "model:a")]) == 0
    assert t.try_acquire([(GLOBAL, "model:b")]) == 0
    wa = t.enqueue([(GLOBAL, "model:a")], priority=0)
    wb = t.enqueue([(GLOBAL, "model:b")], priority=5)
    assert t.release((GLOBAL, "model:b")) == [wb]  # a is still full; b goes first
    assert t.release((GLOBAL, "model:a")) == [wa]


def test_alternatives_take_the_first_with_room_and_cancel_leaves() -> None:
    t = SlotTable(queue_size=10)
    t.set_limit("dep:x", 1)
    t.set_limit("dep:y", 1)
    assert t.try_acquire([("dep:x",), ("dep:y",)]) == 0
    assert t.try_acquire([("dep:x",), ("dep:y",)]) == 1
    w1 = t.enqueue([("dep:x",), ("dep:y",)], priority=1)
    w2 = t.enqueue([("dep:x",), ("dep:y",)], priority=1)
    t.cancel(w1)
    assert t.waiting == 1
    [g] = t.release(("dep:y",))
    assert g is w2 and g.granted == 1
    # Raising a limit lets waiters in too.
    w3 = t.enqueue([("dep:x",)], priority=0)
    assert t.set_limit("dep:x", 2) == [w3]


async def test_gate_waits_in_line_and_times_out_with_retry_after() -> None:
    waits: list[float] = []
    rejects: list[str] = []
    gate = SlotGate(queue_size=5, on_wait=waits.append, on_reject=rejects.append)
    gate.configure(queue_size=5, limits={GLOBAL: 1})
    err = overload_error(503)
    first = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    order: list[int] = []

    async def take(prio: int) -> None:
        s = await gate.acquire([G], priority=prio, timeout=5, overloaded=err)
        order.append(prio)
        s.release()

    tasks = [asyncio.create_task(take(p)) for p in (7, 3, 5)]
    await asyncio.sleep(0)
    assert gate.table.waiting == 3
    first.release()
    first.release()  # idempotent
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [3, 5, 7] and len(waits) == 3
    held = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    with pytest.raises(HapaxError) as info:
        await gate.acquire([G], priority=5, timeout=0.01, overloaded=err)
    assert info.value.status == 503 and info.value.code == "queue_timeout" and info.value.retry_after
    assert rejects == ["queue_timeout"] and gate.table.waiting == 0
    held.release()


async def test_gate_queue_full_is_429_when_configured_and_leaving_frees_the_place() -> None:
    gate = SlotGate(queue_size=1)
    gate.configure(queue_size=1, limits={GLOBAL: 1})
    err = overload_error(429)
    held = await gate.acquire([G], priority=5, timeout=1, overloaded=err)
    waiter = asyncio.create_task(gate.acquire([G], priority=5, timeout=5, overloaded=err))
    await asyncio.sleep(0)
    with pytest.raises(HapaxError) as info:
        await gate.acquire([G], priority=0, timeout=1, overloaded=err)
    assert info.value.status == 429 and info.value.code == "queue_full"
    waiter.cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.table.waiting == 0
    held.release()
    assert gate.table.used(GLOBAL) == 0  # the cancelled waiter got nothing and holds nothing


async def test_dedup_one_call_for_concurrent_identical_requests() -> None:
    d = MemoryInFlight()
    calls = 0
    release = asyncio.Event()

    async def call() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "answer"

    k = dedup_key("alice", "m", "chat", {"b": 1, "a": [1, 2]})
    assert k == dedup_key("alice", "m", "chat", {"a": [1, 2], "b": 1})  # canonical: key order ignored
    assert k != dedup_key("bob", "m", "chat", {"a": [1, 2], "b": 1})
    tasks = [asyncio.create_task(d.run(k, call)) for _ in range(3)]
    await asyncio.sleep(0)
    assert calls == 1  # one leader calls, two followers wait
    release.set()
    assert await asyncio.gather(*tasks) == [("answer", False), ("answer", True), ("answer", True)]
    assert len(d) == 0
    assert await d.run(k, call) == ("answer", False) and calls == 2  # not a cache


async def test_dedup_a_follower_takes_over_when_the_leader_leaves() -> None:
    d = MemoryInFlight()
    calls = 0
    release = asyncio.Event()

    async def call() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "answer"

    tasks = [asyncio.create_task(d.run("k", call)) for _ in range(3)]
    await asyncio.sleep(0)
    tasks[0].cancel()  # the leader's client leaves and its call goes with it
    for _ in range(10):  # a few loop turns: cancellation, then the hand-over
        await asyncio.sleep(0)
    assert calls == 2  # one follower leads a new call; the other follows it
    release.set()
    assert await asyncio.gather(*tasks[1:]) == [("answer", False), ("answer", True)]
    assert tasks[0].cancelled() and len(d) == 0


async def test_dedup_cancels_the_call_when_everyone_left_and_shares_errors() -> None:
    d = MemoryInFlight()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    t = asyncio.create_task(d.run("k", hang))
    await started.wait()
    t.cancel()
    await asyncio.wait_for(cancelled.wait(), 2)

    async def boom() -> str:
        await asyncio.sleep(0)
        raise ValueError("upstream said no")

    a = asyncio.create_task(d.run("e", boom))
    b = asyncio.create_task(d.run("e", boom))
    for r in await asyncio.gather(a, b, return_exceptions=True):
        assert isinstance(r, ValueError)


def test_probe_tracker_thresholds() -> None:
    t = ProbeTracker(HealthCheckConfig(enabled=True, healthy_threshold=2, unhealthy_threshold=2, interval=5),
                     now=0.0)
    assert t.status is ProbeStatus.UNKNOWN and t.next_due == 0.0
    assert t.record(False, now=1.0, error="boom") is None
    assert t.record(True, now=2.0) is None  # streak broken
    assert t.record(False, now=3.0) is None
    assert t.record(False, now=4.0, error="boom") is ProbeStatus.UNHEALTHY
    assert t.last_error == "boom" and t.next_due == 9.0
    assert t.record(True, now=5.0) is None
    assert t.record(True, now=6.0) is ProbeStatus.HEALTHY
