"""Translation between the gateway's public operations.

Theory of operation: a client speaks one operation (``source``), a provider
takes a set of operations. When the provider does not take the source, the
gateway looks up a ``Translation`` from the source to one it does take, and
applies it three ways: the request body on the way in, the JSON response on
the way out, and, for streams, a stateful ``StreamTranslator`` fed each
upstream event and returning the client's events. Translations compose
(completions → chat → messages), so each pair is written once.

All of this is pure: dicts and events in, dicts and events out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._sse import SSEEvent
from .._usage import Usage
from ..providers import Operation


class StreamTranslator(ABC):
    @abstractmethod
    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        """Events to send the client for one upstream event (maybe none)."""

    @abstractmethod
    def finish(self, usage: Usage) -> list[SSEEvent]:
        """Closing events once the upstream stream ended normally."""


@dataclass(frozen=True, slots=True)
class Translation:
    source: Operation
    target: Operation
    #: source request body -> target request body
    request: Callable[[dict[str, Any]], dict[str, Any]]
    #: target response body -> source response body
    response: Callable[[dict[str, Any], Usage], dict[str, Any]]
    #: a fresh stream translator for one response, given the model name to report and the
    #: source request body (stream translators need the client's flags, e.g. include_usage)
    stream: Callable[[str, dict[str, Any]], StreamTranslator]


class _Chained(StreamTranslator):
    def __init__(self, inner: StreamTranslator, outer: StreamTranslator) -> None:
        self.inner, self.outer = inner, outer

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        return [out for mid in self.inner.feed(event) for out in self.outer.feed(mid)]

    def finish(self, usage: Usage) -> list[SSEEvent]:
        out = [o for mid in self.inner.finish(usage) for o in self.outer.feed(mid)]
        return out + self.outer.finish(usage)


def compose(first: Translation, second: Translation) -> Translation:
    """``first`` (A → B) then ``second`` (B → C) gives A → C."""
    assert first.target is second.source
    return Translation(
        source=first.source,
        target=second.target,
        request=lambda body: second.request(first.request(body)),
        response=lambda body, usage: first.response(second.response(body, usage), usage),
        # The inner translator sees the body it was translated from, hence first.request again.
        stream=lambda model, body: _Chained(
            second.stream(model, first.request(body)), first.stream(model, body)
        ),
    )


_DIRECT: dict[tuple[Operation, Operation], Translation] = {}


def register(t: Translation) -> None:
    if (t.source, t.target) in _DIRECT:
        raise RuntimeError(f"translation {t.source}->{t.target} registered twice")
    _DIRECT[(t.source, t.target)] = t


def find_translation(source: Operation, available: frozenset[Operation]) -> Translation | None:
    """The shortest chain of registered translations from ``source`` into ``available``."""
    _load()
    frontier: list[tuple[Operation, Translation | None]] = [(source, None)]
    seen = {source}
    while frontier:
        nxt: list[tuple[Operation, Translation | None]] = []
        for op, chain in frontier:
            for (src, dst), t in _DIRECT.items():
                if src is not op or dst in seen:
                    continue
                full = t if chain is None else compose(chain, t)
                if dst in available:
                    return full
                seen.add(dst)
                nxt.append((dst, full))
        frontier = nxt
    return None


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import _translate_anthropic, _translate_completions  # noqa: F401
