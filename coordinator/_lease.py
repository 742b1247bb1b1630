"""A node's etcd lease: granted once, refreshed every TTL/3, and judged by this node's own clock.

Theory of operation: etcd expires a lease ``ttl`` seconds after the last
keep-alive it received. A node cannot see that clock, but it knows when it *sent*
each keep-alive that succeeded: etcd received it later, so the lease lives at
least until ``sent + ttl``. The keeper calls that ``sent`` ``confirmed`` and
says the lease is

- ``alive`` while ``now < confirmed + ttl * STALE_AFTER``: the margin left is
  for a leader to stop acting as one before anybody else can become one;
- ``stale`` after that: it may still be alive at etcd (the node is cut off), but
  the node must behave as if it were gone;
- ``lost`` once etcd says so (a keep-alive answered with TTL 0, or "lease not
  found"): every key under it is gone, and a new lease is needed.

The keeper only refreshes and judges; the coordinator drives it and decides what
a stale or lost lease means (step down, register again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import aetcd

#: Fraction of the TTL after the last confirmed keep-alive at which the lease counts as stale.
STALE_AFTER: Final = 0.75


class LeaseLost(Exception):
    """etcd no longer has this lease: its keys are gone."""


class LeaseKeeper:
    def __init__(self, client: aetcd.Client, ttl: int, *, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.ttl = ttl
        #: Each call's bound; a keep-alive slower than a third of the TTL is a failed one.
        self.timeout = min(timeout, ttl / 3)
        self.clock = clock
        self.id: int | None = None
        self.confirmed = float("-inf")

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def alive(self) -> bool:
        return self.id is not None and self.clock() < self.confirmed + self.ttl * STALE_AFTER

    @property
    def stale_at(self) -> float:
        return self.confirmed + self.ttl * STALE_AFTER

    async def grant(self) -> int:
        sent = self.clock()
        lease = await asyncio.wait_for(self.client.lease(self.ttl), self.timeout)
        self.id = int(lease.id)
        self.confirmed = sent
        return self.id

    async def refresh(self) -> None:
        """One keep-alive; raises ``LeaseLost`` when etcd has dropped the lease."""
        assert self.id is not None
        sent = self.clock()
        try:
            reply = await asyncio.wait_for(self.client.refresh_lease(self.id), self.timeout)
        except aetcd.exceptions.ClientError as exc:
            if "not found" in str(exc):
                self._lost()
            raise
        if reply is None or reply.TTL <= 0:
            self._lost()
        self.confirmed = sent

    def _lost(self) -> None:
        self.id = None
        self.confirmed = float("-inf")
        raise LeaseLost()

    async def revoke(self) -> None:
        lease, self.id = self.id, None
        if lease is not None:
            await asyncio.wait_for(self.client.revoke_lease(lease), self.timeout)
