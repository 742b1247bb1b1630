"""Where the config comes from: revisioned, immutable snapshots from a source.

Theory of operation: a ``ConfigSource`` owns loading, validation and
keep-last-good. ``current`` is the snapshot in force; ``updates()`` yields,
for as long as it is iterated, one event per thing that happened at the
source:

- ``ConfigSnapshot``: a valid config that differs from the one in force, with
  the next revision. The node applies it; requests already running keep the
  snapshot they started with (``hapax.routing._runtime``).
- ``ConfigRejected``: an invalid one. Nothing changes; the last good snapshot
  stays ``current``, and the node counts and logs it.

A touch, a rewrite with the same bytes, or a change that parses to the same
config (a comment edited) yields nothing: the revision counts applied changes,
so an operator comparing revisions across nodes compares configs. The rules
live in ``Revisions`` (sans-IO, no clock, no files); a source does only the
I/O: the file source in ``node`` polls a file, the etcd one watches a key.

Rules for a source: it never raises out of ``updates()`` for a bad config or a
failed read (that is a ``ConfigRejected``); it does its parsing off the event
loop; ``poke()`` asks it to look now (SIGHUP), where it has a notion of now.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .._errors import ConfigError
from ._config import Config


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """One config as applied: what it is, which revision, and where it came from."""

    config: Config
    #: 1 for the config a node started with; +1 per applied change (a source that has its
    #: own numbering, etcd's, uses that: increasing, not necessarily by one).
    revision: int
    #: ``file:/etc/hapax/hapax.yaml``, ``embedded``, ...: where to look for it.
    source: str
    #: SHA-256 of the bytes it was parsed from (``sha256sum`` of the file); empty when
    #: there were none (a config built in code).
    digest: str = ""


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    """A config the source could not apply; the last good one stays in force."""

    error: ConfigError
    source: str
    digest: str = ""


ConfigEvent = ConfigSnapshot | ConfigRejected


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Revisions:
    """Keep-last-good: turns what a source loaded into the events it yields."""

    def __init__(self, initial: ConfigSnapshot) -> None:
        self.current = initial
        #: The digest last offered, good or bad: the same bytes again need no second look.
        self._seen = initial.digest

    def unchanged(self, digest: str) -> bool:
        """The bytes are those looked at last: nothing to parse (a touch, a rewrite of the same)."""
        return bool(digest) and digest == self._seen

    def offer(
        self, result: Config | ConfigError, *, digest: str = "", revision: int | None = None
    ) -> ConfigEvent | None:
        """What loading gave; the event to yield, or ``None`` when nothing changed.

        ``revision`` is the source's own number for it, if it has one (it must be higher
        than the current one); without, the next integer.
        """
        self._seen = digest
        if isinstance(result, ConfigError):
            return ConfigRejected(result, self.current.source, digest)
        if result == self.current.config:
            return None
        rev = self.current.revision + 1 if revision is None else revision
        if rev <= self.current.revision:
            return ConfigRejected(
                ConfigError(f"revision {rev} is not newer than the one in force ({self.current.revision})"),
                self.current.source, digest,
            )
        self.current = ConfigSnapshot(result, rev, self.current.source, digest)
        return self.current


class ConfigSource(ABC):
    """Loads, validates and keeps the last good config; see the module's theory of operation."""

    @property
    @abstractmethod
    def current(self) -> ConfigSnapshot:
        """The last good snapshot: the one in force once the node applied what was yielded."""

    @abstractmethod
    def updates(self) -> AsyncIterator[ConfigEvent]:
        """New snapshots and rejections, as they happen; runs until the iteration stops."""

    def poke(self) -> None:
        """Look at the source now rather than at the next poll (SIGHUP)."""
        return None
