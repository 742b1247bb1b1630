"""Server-sent events, sans-IO.

Theory of operation: ``SSEDecoder.feed(chunk)`` takes bytes as they arrive, in
any split (one byte at a time included), and returns the complete events seen
so far. An event ends at a blank line; ``\\r\\n``, ``\\r`` and ``\\n`` all end a
line, as the spec says. Comment lines (``:``) are dropped. ``close()`` returns
a trailing event that was never terminated, so a truncated stream is visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class SSEEvent:
    data: bytes
    event: str | None = None
    _json: Any = field(default=None, repr=False)

    def json(self) -> Any:
        """The data parsed as JSON, parsed once."""
        if self._json is None:
            self._json = orjson.loads(self.data)
        return self._json


class SSEDecoder:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # Normalise line ends, but keep a trailing \r: its \n may be in the next chunk.
            tail = b"\r" if buf.endswith(b"\r") else b""
            buf = buf[: len(buf) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        events: list[SSEEvent] = []
        # Scan with an index and slice the remainder once: a read often holds many events.
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            if buf.startswith(b"data: ", pos) and buf.find(b"\n", pos, end) < 0:
                # The usual event, one "data: ..." line: no block slice, no parse call.
                events.append(SSEEvent(buf[pos + 6 : end]))
            else:
                ev = _parse_block(buf[pos:end])
                if ev is not None:
                    events.append(ev)
            pos = end + 2
        self._buf = buf[pos:] if pos else buf
        return events

    def close(self) -> SSEEvent | None:
        block, self._buf = self._buf.strip(b"\r\n"), b""
        return _parse_block(block) if block else None

    @property
    def pending(self) -> int:
        return len(self._buf)


def _parse_block(block: bytes) -> SSEEvent | None:
    # Fast path: the usual OpenAI event is one "data: ..." line.
    if block.startswith(b"data: ") and b"\n" not in block:
        return SSEEvent(data=block[6:])
    data: list[bytes] = []
    event: str | None = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data and event is None:
        return None
    return SSEEvent(data=b"\n".join(data), event=event)


def encode(data: bytes, event: str | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
