"""The transport-neutral request and response that every front door adapts to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    method: str
    path: str
    #: Header names are matched case-insensitively by the front door's mapping.
    headers: Mapping[str, str]
    body: bytes
    remote: str = ""
    query: Mapping[str, str] = field(default_factory=dict)
    #: Which front door it came through (``h1``, ``h3``): the ``protocol`` label of the request metrics.
    protocol: str = "h1"


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    #: When set, the body is streamed chunk by chunk and ``body`` is ignored.
    stream: AsyncIterator[bytes] | None = None
