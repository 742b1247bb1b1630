"""The one seam through which all upstream I/O flows.

``hapax`` owns no sockets. A ``Transport`` turns an ``UpstreamRequest`` into an
``UpstreamResponse``; the node supplies one backed by a pooled aiohttp session
per provider. Transports translate their library's exceptions into the
``Transport*`` errors below, so providers never see aiohttp.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from .config import Timeouts


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None
    timeouts: Timeouts


class UpstreamResponse(ABC):
    status: int
    headers: Mapping[str, str]

    @abstractmethod
    async def read(self) -> bytes:
        """The whole body; raises TransportError subclasses."""

    @abstractmethod
    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; each wait bounded by ``stream_idle``."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; safe to call twice."""


class Transport(ABC):
    @abstractmethod
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send and return once response headers arrive (bounded by ``first_byte``)."""

    @abstractmethod
    async def aclose(self) -> None: ...


class TransportError(Exception):
    """Base of transport failures; never shown to clients as is."""


class ConnectError(TransportError):
    pass


class ReadError(TransportError):
    """The connection broke or the body was cut short."""


class ConnectTimeout(TransportError):
    pass


class FirstByteTimeout(TransportError):
    pass


class StreamIdleTimeout(TransportError):
    pass


class TotalTimeout(StreamIdleTimeout):
    """The whole exchange outlived the provider's ``timeouts.total``."""
