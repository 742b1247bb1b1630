"""coordinator.Coordinator and the etcd ConfigSource against a real etcd.

Three coordinators in one process play three nodes: what a node can see of
them is their member records, the leader key and each one's ``is_leader``. The
election tests sample every coordinator's ``is_leader`` every few milliseconds
while leadership moves, so "never two leaders" is checked at every sample, not
only at the end. A cut-off leader talks to etcd through a TCP proxy the test
cuts (``tests.test_etcd_watch.Proxy``), so etcd stays up for the others.
"""

from __future__ import annotations

import asyncio
import time

import aetcd
import pytest
import yaml

from coordinator import Coordinator, EtcdConfigSource, config_key, leader_key, nodes_prefix
from coordinator._keys import NodeRecord
from hapax.config import Config, ConfigRejected, ConfigSnapshot, EtcdConfig, config_from_bytes
from tests.etcd_server import EtcdServer
from tests.test_etcd_watch import Proxy, put_once_up, until

TTL = 2


def _etcd(port: int) -> EtcdConfig:
    return EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout=1.0)


def _coordinator(port: int, cluster: str, node_id: str) -> Coordinator:
    return Coordinator(_etcd(port), cluster=cluster, node_id=node_id, address=f"127.0.0.1:{9000 + int(node_id[-1])}",
                       version="test", lease_ttl=TTL)


class Sampler:
    """Samples who leads, every 5 ms, from a task: never two at once, and when each first led."""

    def __init__(self, coords: list[Coordinator]) -> None:
        self.coords = coords
        self.overlaps: list[list[str]] = []
        self.first_led: dict[str, float] = {}
        self.last_led: dict[str, float] = {}
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            leading = [c.node_id for c in self.coords if c.is_leader]
            if len(leading) > 1:
                self.overlaps.append(leading)
            for n in leading:
                self.first_led.setdefault(n, now)
                self.last_led[n] = now
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _leaders(coords: list[Coordinator]) -> list[Coordinator]:
    return [c for c in coords if c.is_leader]


async def _the_leader(coords: list[Coordinator]) -> tuple[Coordinator, list[Coordinator]]:
    """Once exactly one leads: the leader, and the others."""
    await until(lambda: len(_leaders(coords)) == 1, "a leader")
    leader = _leaders(coords)[0]
    return leader, [c for c in coords if c is not leader]


async def _three(port: int, cluster: str) -> list[Coordinator]:
    coords = [_coordinator(port, cluster, f"node-{i}") for i in (1, 2, 3)]
    await asyncio.gather(*(c.start() for c in coords))
    return coords


async def _close(coords: list[Coordinator]) -> None:
    await asyncio.gather(*(c.aclose() for c in coords), return_exceptions=True)


async def test_exactly_one_leader_among_three_and_every_member_registered(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    coords = await _three(etcd_server.port, cluster_name)
    try:
        await until(lambda: len(_leaders(coords)) == 1, "a leader")
        leader = _leaders(coords)[0]
        await until(lambda: all(c.leader == leader.node_id for c in coords), "every node to name the leader")
        await until(lambda: all(len(c.nodes) == 3 for c in coords), "every node to see three members")
        sampler = Sampler(coords)
        await asyncio.sleep(TTL * 1.5)  # several keep-alive rounds: leadership must not wander
        await sampler.stop()
        assert sampler.overlaps == []
        assert list(sampler.first_led) == [leader.node_id]
        got = await direct.get(leader_key(cluster_name))
        assert got is not None and got.value == leader.node_id.encode()
        members = await direct.get_prefix(nodes_prefix(cluster_name))
        records = [NodeRecord.decode(kv.value) for kv in members.kvs]
        assert sorted(r.id for r in records if r is not None) == ["node-1", "node-2", "node-3"]
        view = coords[0].view()
        assert view["leader"] == leader.node_id
        assert [n["id"] for n in view["nodes"]] == ["node-1", "node-2", "node-3"]
        assert [n["leader"] for n in view["nodes"]] == [c is leader for c in coords]
        assert view["dependencies"]["etcd"] == "ok"
    finally:
        await _close(coords)


async def test_a_revoked_lease_moves_leadership_within_the_ttl(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    coords = await _three(etcd_server.port, cluster_name)
    try:
        await until(lambda: len(_leaders(coords)) == 1, "a leader")
        old = _leaders(coords)[0]
        assert old.lease.id is not None
        sampler = Sampler(coords)
        revoked = time.monotonic()
        await direct.revoke_lease(old.lease.id)  # as etcd expiring it: the key and the record go
        await until(lambda: any(c.is_leader for c in coords if c is not old), "a new leader", TTL + 5)
        took = time.monotonic() - revoked
        await until(lambda: old.lease.id is not None and len(old.nodes) == 3, "the old leader to register again")
        await sampler.stop()
        assert sampler.overlaps == []
        assert took < TTL + 1, f"a new leader took {took:.2f} s"
        assert len(_leaders(coords)) == 1 and not old.is_leader
    finally:
        await _close(coords)


async def test_a_leader_that_dies_is_replaced_within_the_ttl_plus_a_second(
    etcd_server: EtcdServer, cluster_name: str
) -> None:
    coords = await _three(etcd_server.port, cluster_name)
    try:
        old, rest = await _the_leader(coords)
        # Dies as with SIGKILL: no more keep-alives, no revoke, its lease left to expire at etcd.
        assert old._task is not None
        old._task.cancel()
        for t in old._watch_tasks:
            t.cancel()
        await old.nodes_watch.close()
        await old.leader_watch.close()
        await old.client.close()
        died = time.monotonic()
        old.is_leader = False  # the process is gone: it leads nothing
        await until(lambda: len(_leaders(rest)) == 1, "a new leader", TTL + 5)
        took = time.monotonic() - died
        assert took < TTL + 1, f"a new leader took {took:.2f} s"
        await until(lambda: all(len(c.nodes) == 2 for c in rest), "the dead node's record to vanish")
        assert all(c.leader == _leaders(rest)[0].node_id for c in rest)
        old._closed = True
        coords = rest
    finally:
        await _close(coords)


async def test_a_leader_cut_off_from_etcd_steps_down_before_another_can_win(
    etcd_server: EtcdServer, cluster_name: str
) -> None:
    proxy = Proxy(etcd_server.port)
    await proxy.open()
    cut_off = _coordinator(proxy.port, cluster_name, "node-1")
    await cut_off.start()
    await until(lambda: cut_off.is_leader, "the first node to lead")
    rest = [_coordinator(etcd_server.port, cluster_name, f"node-{i}") for i in (2, 3)]
    await asyncio.gather(*(c.start() for c in rest))
    coords = [cut_off, *rest]
    degraded: list[bool] = []
    cut_off.on_degraded.append(degraded.append)
    try:
        await until(lambda: all(c.leader == "node-1" for c in coords), "every node to name node-1")
        sampler = Sampler(coords)
        last_confirmed = cut_off.lease.confirmed
        await proxy.cut()
        cut_at = time.monotonic()
        await until(lambda: len(_leaders(rest)) == 1, "a new leader", TTL + 5)
        won_by = time.monotonic()  # the new leader leads by now; the sampler may not have seen it yet
        took = won_by - cut_at
        await sampler.stop()
        assert sampler.overlaps == []
        assert not cut_off.is_leader
        stepped_down = sampler.last_led["node-1"]
        new_leader = _leaders(rest)[0].node_id
        # It stopped leading before etcd could have expired its lease (the lease lives at least
        # ttl after the last keep-alive it confirmed), and so before anybody else won.
        assert stepped_down < last_confirmed + TTL
        assert stepped_down < sampler.first_led.get(new_leader, won_by)
        assert took < TTL + 1, f"a new leader took {took:.2f} s after the cut"
        assert degraded and degraded[-1] is True
        assert cut_off.view()["dependencies"]["etcd"] == "unreachable"
    finally:
        await _close(coords)
        await proxy.cut()


async def test_resign_on_shutdown_hands_leadership_over_at_once(
    etcd_server: EtcdServer, cluster_name: str
) -> None:
    coords = await _three(etcd_server.port, cluster_name)
    try:
        old, rest = await _the_leader(coords)
        t0 = time.monotonic()
        await old.aclose()
        await until(lambda: len(_leaders(rest)) == 1, "a new leader", TTL + 5)
        # No waiting for the lease: the revoke deletes the key and the others campaign on the delete.
        assert time.monotonic() - t0 < TTL / 2
        coords = rest
    finally:
        await _close(coords)


# -- the etcd ConfigSource -------------------------------------------------------------


def _yaml(model: str, *, port: int = 1) -> bytes:
    return yaml.safe_dump({
        "server": {"host": "0.0.0.0", "port": port},
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": model, "provider": "m"}],
    }).encode()


def _bootstrap(etcd: EtcdServer, cluster: str) -> Config:
    return config_from_bytes(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 4321},
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": "bootstrap", "provider": "m"}],
        "state": {"cluster": cluster},
        "cluster": {"etcd": {"endpoints": [etcd.url]}},
    }).encode())


class Events:
    """What ``source.updates()`` yields, pumped into a queue by a task (a timed-out wait on the
    queue leaves the iterator running, where one on ``anext`` would close it)."""

    def __init__(self, source: EtcdConfigSource) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(source))

    async def _pump(self, source: EtcdConfigSource) -> None:
        async for event in source.updates():
            self.queue.put_nowait(event)

    async def next(self, timeout: float = 5) -> object:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_config_source_applies_each_valid_revision_keeps_the_last_good_on_a_bad_one(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    key = config_key(cluster_name)
    client = aetcd.Client(port=etcd_server.port, timeout=2)
    seen: list[int] = []
    source = EtcdConfigSource(client, cluster_name, _bootstrap(etcd_server, cluster_name), timeout=1.0,
                              on_seen=seen.append)
    updates: Events | None = None
    try:
        assert await source.start() is None  # nothing pushed: the bootstrap file, revision 0
        assert source.current.revision == 0
        assert [m.name for m in source.current.config.models] == ["bootstrap"]
        updates = Events(source)
        pushed = await direct.put(key, _yaml("first"))
        rev1 = int(pushed.header.revision)
        event = await updates.next()
        assert isinstance(event, ConfigSnapshot)
        assert event.revision == rev1 == source.current.revision
        assert [m.name for m in event.config.models] == ["first"]
        # Node-local settings stay the node's: where it listens, its state and cluster.
        assert (event.config.server.host, event.config.server.port) == ("127.0.0.1", 4321)
        assert event.config.state.cluster == cluster_name
        assert event.config.cluster.etcd.endpoints == (etcd_server.url,)

        bad = await direct.put(key, b"models: [{name: x, provider: nowhere}]\n")
        event = await updates.next()
        assert isinstance(event, ConfigRejected)
        assert "nowhere" in str(event.error)
        assert source.current.revision == rev1
        assert seen[-1] == int(bad.header.revision)

        await direct.put(key, b"\xff\xfe not utf-8")
        assert isinstance(await updates.next(), ConfigRejected)
        assert [m.name for m in source.current.config.models] == ["first"]

        await direct.delete(key)  # deleted: the config in force stays
        with pytest.raises(TimeoutError):
            await updates.next(0.5)
        assert source.current.revision == rev1

        third = await direct.put(key, _yaml("third"))
        event = await updates.next()
        assert isinstance(event, ConfigSnapshot) and event.revision == int(third.header.revision)
        assert [m.name for m in event.config.models] == ["third"]
    finally:
        if updates is not None:
            await updates.close()
        await source.aclose()
        await client.close()


async def test_config_source_starts_on_what_etcd_holds_and_resumes_after_an_outage(
    cluster_name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    own = EtcdServer().start()
    try:
        direct = aetcd.Client(port=own.port, timeout=5)
        await direct.connect()
        key = config_key(cluster_name)
        first = await direct.put(key, _yaml("first"))
        client = aetcd.Client(port=own.port, timeout=1)
        source = EtcdConfigSource(client, cluster_name, _bootstrap(own, cluster_name), timeout=1.0)
        updates: Events | None = None
        try:
            event = await source.start()
            assert isinstance(event, ConfigSnapshot) and event.revision == int(first.header.revision)
            updates = Events(source)
            pending = asyncio.ensure_future(updates.next(30))
            own.stop()
            await until(lambda: not source.watch.connected, "the watch to see the outage")
            assert not pending.done()
            assert source.current.revision == int(first.header.revision)  # the last good stays
            own.start()
            await direct.close()
            direct = aetcd.Client(port=own.port, timeout=5)
            await direct.connect()
            second = await put_once_up(direct, key, _yaml("second"))
            event = await pending
            assert isinstance(event, ConfigSnapshot) and event.revision == int(second.header.revision)
            assert [m.name for m in event.config.models] == ["second"]
        finally:
            if updates is not None:
                await updates.close()
            await source.aclose()
            await client.close()
            await direct.close()
    finally:
        own.remove()
