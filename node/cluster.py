"""A node's membership of an etcd cluster (``hapax serve --etcd``): the wiring, not the logic.

``coordinator`` holds the logic (lease, member record, election, the etcd
``ConfigSource``); this builds it from the node's config and connects it to the
gateway: the config source replaces the file's, the metrics follow leadership,
membership and etcd's reachability, and ``/admin/cluster`` reads the view.

Workers: each worker process of ``--workers N`` is a member of its own
(``<node_id>-w<N>``): it has its own etcd client, lease and config watch, it
applies each revision itself and publishes the revision it runs, and it
campaigns like any node. ``hapax cluster status`` therefore shows every worker,
a disagreement between the workers of one host is visible like one between
hosts, and a worker that dies takes only its own record with it. The leader is
one process of the whole cluster (at most one worker of one host probes).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from coordinator import Coordinator, EtcdConfigSource
from hapax import Gateway, __version__
from hapax.config import Config
from hapax.state import FailoverState

from .workers import WorkerIdentity

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def node_id(config: Config, identity: WorkerIdentity) -> str:
    base = config.cluster.node_id or f"{socket.gethostname()}-{config.server.port}"
    return f"{base}-w{identity.index}" if identity.count > 1 else base


def advertise_address(config: Config) -> str:
    if config.cluster.advertise_address:
        return config.cluster.advertise_address
    host = config.server.host
    if host in WILDCARDS:
        host = socket.gethostname()
    return f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"


class ClusterMember:
    """The coordinator and the etcd config source of one node (or worker)."""

    def __init__(self, config: Config, *, identity: WorkerIdentity,
                 prepare: Callable[[Config], Config] | None = None) -> None:
        etcd = config.cluster.etcd
        self.coordinator = Coordinator(
            etcd, cluster=config.state.cluster, node_id=node_id(config, identity),
            address=advertise_address(config), version=__version__, lease_ttl=config.cluster.lease_ttl,
        )
        self.source = EtcdConfigSource(self.coordinator.client, config.state.cluster, config,
                                       timeout=etcd.timeout, prepare=prepare, on_seen=self.coordinator.seen)

    def attach(self, gateway: Gateway) -> None:
        """Metrics and the view's live figures from the gateway."""
        c, m = self.coordinator, gateway.metrics
        c.in_flight = lambda: gateway.in_flight
        state = gateway.access.state

        def redis() -> str:
            if not isinstance(state, FailoverState):
                return "none"
            return "unreachable" if state.degraded else "ok"

        c.redis = redis
        gateway.access.cluster_view = self.view
        # Leader duties: only the leader probes, and its verdicts reach the others through Redis.
        gateway.dispatcher.probe_gate = lambda: c.is_leader
        c.on_leadership.append(lambda leader: gateway.dispatcher.wake_prober() if leader else None)
        gateway.dispatcher.retell_probes = True
        m.cluster_leader.set(to=0)
        m.cluster_nodes.set(to=0)
        m.degraded.set("etcd", to=1)  # until the first round answers
        c.on_leadership.append(lambda leader: m.cluster_leader.set(to=1 if leader else 0))
        c.on_nodes.append(lambda n: m.cluster_nodes.set(to=n))
        c.on_degraded.append(lambda down: m.degraded.set("etcd", to=1 if down else 0))

    async def start(self, apply: Callable[[Any], bool]) -> None:
        """Join before serving: one bounded round, then the config etcd holds, if any (applied
        with ``apply``, the node's own). Without etcd the node starts on its bootstrap file."""
        await self.coordinator.start()
        first = await self.source.start()
        if first is not None:
            apply(first)

    def applied(self, revision: int) -> None:
        self.coordinator.publish(revision)

    def view(self) -> dict[str, Any]:
        return self.coordinator.view()

    async def resign(self) -> None:
        """Resign (the leader key and the member record go at once) and close our watches; the
        client stays open for the key store and the reload watch, which the node closes last."""
        await self.source.aclose()
        await self.coordinator.aclose(close_client=False)
