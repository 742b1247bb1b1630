"""Routing: which deployment serves a model (the route table), in what order (balancing), how
failures are retried and contained (retry, breakers, health), and who waits (admission queue, dedup)."""

from __future__ import annotations

from ._balancer import STRATEGIES
from ._dispatch import Dispatcher
from ._runtime import Runtime, TransportFactory

__all__ = ["STRATEGIES", "Dispatcher", "Runtime", "TransportFactory"]
