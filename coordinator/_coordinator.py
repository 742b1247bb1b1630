"""A node's part in the cluster: its lease, its member record, the election, and what it sees.

Theory of operation: one task (``_run``) drives everything that writes to etcd,
once per ``lease_ttl / 3`` or sooner when woken (a new applied config revision,
a vacant leader key):

1. keep the lease alive (``LeaseKeeper``), granting a new one when etcd dropped it
   (its member record and any leadership went with it);
2. write the member record under the lease when it changed (config revision,
   in-flight count) or the lease is new;
3. campaign when the leader key is vacant, or still names this node: a
   transaction creates ``/hapax/<cluster>/leader`` under our lease only if it does
   not exist, else reads it. etcd serialises transactions, so at most one node
   holds the key; the holder is the leader.

Two watches (``PrefixWatch``) keep the member list and the leader key, so
``/admin/cluster`` and the probes' gate read memory, never etcd. A node steps
down (``leader`` false, the callbacks told) as soon as the key names someone
else, and by itself when its lease turns stale (``coordinator._lease``): a
leader cut off from etcd stops probing before its lease can expire and another
node can win. Shutdown resigns by revoking the lease: etcd deletes the member
record and the leader key at once, and the others campaign on the delete.

Every etcd call is bounded by ``cluster.etcd.timeout`` (and a third of the TTL
for keep-alives); a failed round marks etcd unreachable (``on_degraded``), and
the next round retries. Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aetcd

from hapax.config import EtcdConfig

from ._cancel import raise_if_cancelling
from ._etcd import connect
from ._keys import NodeRecord, config_key, leader_key, nodes_prefix
from ._lease import LeaseKeeper, LeaseLost
from ._watch import BACKOFF_MAX, PrefixWatch

log = logging.getLogger("hapax.coordinator")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Coordinator:
    """Membership and election for one node; owns the node's etcd client (``client``)."""

    def __init__(
        self,
        etcd: EtcdConfig,
        *,
        cluster: str,
        node_id: str,
        address: str,
        version: str,
        lease_ttl: int,
        in_flight: Callable[[], int] = lambda: 0,
        redis: Callable[[], str] = lambda: "none",
    ) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.address = address
        self.version = version
        self.started_at = time.time()
        self.timeout = etcd.timeout
        self.client: aetcd.Client = connect(etcd)
        self.lease = LeaseKeeper(self.client, lease_ttl, timeout=etcd.timeout)
        #: Requests in flight on this node, for its record; the node sets it.
        self.in_flight = in_flight
        #: The Redis dependency's state for the view ("ok", "unreachable", "none").
        self.redis = redis
        self._leader_key = leader_key(cluster)
        self._node_key = nodes_prefix(cluster) + node_id.encode()
        self.nodes_watch = PrefixWatch(self.client, nodes_prefix(cluster), on_change=self._nodes_changed,
                                       timeout=etcd.timeout)
        self.leader_watch = PrefixWatch(self.client, self._leader_key, on_change=self._leader_changed,
                                        timeout=etcd.timeout)
        #: This node holds the leader key under a lease it knows to be alive.
        self.is_leader = False
        #: The id the leader key names, as last seen (``None``: vacant or not known).
        self.leader: str | None = None
        self.nodes: dict[str, NodeRecord] = {}
        #: The config revision this node runs (``publish``).
        self.config_revision = 0
        #: The revision of the desired config in etcd, as this node last saw it (valid or not).
        self.desired_revision = 0
        #: etcd answered the last round and the watches are up.
        self.reachable = False
        self.on_leadership: list[Callable[[bool], None]] = []
        self.on_degraded: list[Callable[[bool], None]] = []
        self.on_nodes: list[Callable[[int], None]] = []
        self.on_lease_lost: list[Callable[[], None]] = []
        self._written: NodeRecord | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._stale_timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Join: one bounded round now (so a healthy cluster has this node registered, and maybe
        leading, before it serves), then the background task. Never raises: without etcd the
        node serves on what it has and keeps trying."""
        for w in (self.nodes_watch, self.leader_watch):
            self._watch_tasks.append(asyncio.create_task(self._start_watch(w)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._watch_tasks), self.timeout)
        await self._round()
        self._task = asyncio.create_task(self._run(), name="hapax-coordinator")

    async def resign(self) -> None:
        """Leave the cluster: stop campaigning, give up leadership and the member record."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._set_leader(False)
        try:
            await self.lease.revoke()  # etcd deletes the member record and the leader key with it
        except Exception as exc:
            log.warning("could not revoke the etcd lease; it expires by itself",
                        extra={"fields": {"error": type(exc).__name__, "ttl_s": self.lease.ttl}})

    async def aclose(self, *, close_client: bool = True) -> None:
        """Resign if not yet, close the watches and (unless the caller still needs it) the client."""
        if not self._closed:
            await self.resign()
        for t in self._watch_tasks:
            t.cancel()
        await self.nodes_watch.close()
        await self.leader_watch.close()
        if close_client:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), self.timeout)

    def publish(self, revision: int) -> None:
        """The node now runs config ``revision``: its member record says so at once."""
        if revision != self.config_revision:
            self.config_revision = revision
            self._wake.set()

    def seen(self, revision: int) -> None:
        """The desired config in etcd is now at ``revision`` (valid or not)."""
        self.desired_revision = max(self.desired_revision, revision)

    # -- the round ---------------------------------------------------------------------

    async def _start_watch(self, w: PrefixWatch) -> None:
        delay = 0.05
        while True:
            try:
                await w.start()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling(exc)
                log.debug("etcd watch could not start: %s", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.lease.interval)
            raise_if_cancelling()
            self._wake.clear()
            await self._round()
            raise_if_cancelling()

    async def _round(self) -> None:
        try:
            await self._step()
            ok = True
        except LeaseLost:
            log.warning("etcd lease lost; registering again", extra={"fields": {"node": self.node_id}})
            self._set_leader(False)
            self._written = None
            for cb in self.on_lease_lost:
                cb()
            self._wake.set()  # a new lease now, not a round later
            ok = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise_if_cancelling(exc)
            ok = False
            log.debug("etcd round failed: %s", type(exc).__name__)
        self._check_stale()
        self._set_reachable(ok and self.nodes_watch.connected and self.leader_watch.connected)

    async def _step(self) -> None:
        lease = self.lease
        if lease.id is None:
            await lease.grant()
            self._written = None
            log.info("etcd lease granted", extra={"fields": {"node": self.node_id, "ttl_s": lease.ttl}})
        elif time.monotonic() - lease.confirmed >= lease.interval * 0.9:
            await lease.refresh()
        self._arm_stale()
        rec = self.record()
        if rec != self._written:
            await asyncio.wait_for(self.client.put(self._node_key, rec.encode(), lease=lease.id), self.timeout)
            self._written = rec
        if not self.is_leader and self.leader in (None, self.node_id):
            await self._campaign()

    async def _campaign(self) -> None:
        c = self.client
        key, lease = self._leader_key, self.lease.id
        won, responses = await asyncio.wait_for(c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, self.node_id.encode(), lease=lease)],
            failure=[c.transactions.get(key)],
        ), self.timeout)
        if won:
            self.leader = self.node_id
            self._set_leader(True)
            return
        held = responses[0] if responses else []
        if held:
            value, kv = held[0]
            holder = value.decode(errors="replace")
            self.leader = holder
            # Still ours from before a stale spell, under the lease we still hold: lead again.
            self._set_leader(holder == self.node_id and kv.lease == lease)

    def record(self) -> NodeRecord:
        return NodeRecord(id=self.node_id, address=self.address, version=self.version,
                          started_at=self.started_at, config_revision=self.config_revision,
                          in_flight=self.in_flight())

    # -- what the watches say ----------------------------------------------------------

    def _nodes_changed(self, view: Mapping[bytes, bytes], _revision: int) -> None:
        nodes = {}
        for raw in view.values():
            rec = NodeRecord.decode(raw)
            if rec is not None:
                nodes[rec.id] = rec
        self.nodes = nodes
        for cb in self.on_nodes:
            cb(len(nodes))

    def _leader_changed(self, view: Mapping[bytes, bytes], _revision: int) -> None:
        raw = view.get(self._leader_key)
        self.leader = raw.decode(errors="replace") if raw is not None else None
        if self.leader != self.node_id:
            self._set_leader(False)
        if self.leader is None or (self.leader == self.node_id and not self.is_leader):
            self._wake.set()  # vacant: campaign now, not at the next round

    # -- transitions -------------------------------------------------------------------

    def _arm_stale(self) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        delay = max(0.0, self.lease.stale_at - time.monotonic())
        self._stale_timer = asyncio.get_running_loop().call_later(delay, self._check_stale)

    def _check_stale(self) -> None:
        if self.is_leader and not self.lease.alive():
            log.warning("etcd keep-alives are failing; stepping down before the lease can expire",
                        extra={"fields": {"node": self.node_id}})
            self._set_leader(False)
            self._set_reachable(False)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        log.info("cluster leader: this node" if leader else "no longer the cluster leader",
                 extra={"fields": {"node": self.node_id, "cluster": self.cluster}})
        for cb in self.on_leadership:
            cb(leader)

    def _set_reachable(self, ok: bool) -> None:
        if ok == self.reachable:
            return
        self.reachable = ok
        if ok:
            log.info("etcd reachable", extra={"fields": {"node": self.node_id}})
        else:
            log.warning("etcd unreachable; serving on the last good config", extra={"fields": {"node": self.node_id}})
        for cb in self.on_degraded:
            cb(not ok)

    # -- the view ----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """``GET /admin/cluster``: the cluster as this node sees it (from memory)."""
        nodes = dict(self.nodes)
        nodes[self.node_id] = self.record()  # this node's own, fresher than its record in etcd
        return status(self.cluster, self.leader, self.desired_revision, nodes.values(),
                      {"etcd": "ok" if self.reachable else "unreachable", "redis": self.redis()})


def status(cluster: str, leader: str | None, revision: int, nodes: Iterable[NodeRecord],
           dependencies: dict[str, str]) -> dict[str, Any]:
    """The cluster status document: ``GET /admin/cluster`` and ``hapax cluster status --json``."""
    return {
        "cluster": cluster,
        "leader": leader,
        "revision": revision,
        "nodes": [{
            "id": n.id, "address": n.address, "version": n.version,
            "config_revision": n.config_revision, "leader": n.id == leader,
            "started_at": iso(n.started_at), "in_flight": n.in_flight,
        } for n in sorted(nodes, key=lambda n: n.id)],
        "dependencies": dependencies,
    }


async def read_status(client: aetcd.Client, cluster: str, *, timeout: float) -> dict[str, Any]:
    """The status document from etcd itself (``hapax cluster status --etcd``): the member records,
    the leader key and the config key's revision, each read bounded."""
    members = await asyncio.wait_for(client.get_prefix(nodes_prefix(cluster)), timeout)
    held = await asyncio.wait_for(client.get(leader_key(cluster)), timeout)
    desired = await asyncio.wait_for(client.get(config_key(cluster)), timeout)
    nodes = [r for r in (NodeRecord.decode(kv.value) for kv in members.kvs) if r is not None]
    leader = held.value.decode(errors="replace") if held is not None else None
    return status(cluster, leader, int(desired.mod_revision) if desired is not None else 0, nodes,
                  {"etcd": "ok", "redis": "not checked"})
