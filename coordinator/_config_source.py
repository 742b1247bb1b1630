"""The cluster's config as a ``ConfigSource``: the key ``/hapax/<cluster>/config``, watched.

Theory of operation: a ``PrefixWatch`` on the key tells when it changed; the
source then reads the key itself (bounded), because the snapshot's revision
must be the key's own ``mod_revision`` (the number ``hapax config history``
shows, the same on every node) and the watch only knows the store's. The bytes
are parsed off the loop, with the node's environment (``${VAR}`` secrets stay
references in etcd, each node expands its own), and validated like a file.

What the node runs is the pushed config with its node-local settings kept from
the bootstrap file: ``server.host``, ``server.port``, ``server.workers``,
``state`` and ``cluster`` (where a node listens and how it reaches Redis and
etcd belong to the node, not to the cluster), then the command line's overrides.

- A valid revision is yielded as a ``ConfigSnapshot`` numbered by its
  ``mod_revision``, even when it parses to the config in force (a rollback to
  the same content): every node then reports the revision etcd holds.
- An invalid one is a ``ConfigRejected``: the last good stays, and the
  revision the node reports does not move.
- An empty key (a new cluster, nothing pushed) or a deleted one: the node keeps
  what it runs, its bootstrap file's config at first, reported as revision 0.
- etcd unreachable: nothing arrives, the last good stays; the watch resumes from
  its revision when etcd is back, so the newest revision is then applied.

Bursts coalesce: the source reads the key once per wake-up, so of several
pushes in quick succession a node may apply only the newest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

import aetcd

from hapax import ConfigError
from hapax.config import Config, ConfigEvent, ConfigRejected, ConfigSnapshot, ConfigSource, config_from_bytes, digest_of

from ._cancel import raise_if_cancelling
from ._keys import config_key
from ._watch import BACKOFF_MAX, PrefixWatch

log = logging.getLogger("hapax.coordinator")

#: The revision a node reports while it runs its bootstrap file (nothing pushed yet).
BOOTSTRAP_REVISION: Final = 0


def node_local(pushed: Config, bootstrap: Config) -> Config:
    """``pushed`` with the node's own listener, state and cluster settings (module docstring)."""
    b = bootstrap.server
    server = pushed.server.model_copy(update={"host": b.host, "port": b.port, "workers": b.workers})
    return pushed.model_copy(update={"server": server, "state": bootstrap.state, "cluster": bootstrap.cluster})


class EtcdConfigSource(ConfigSource):
    def __init__(
        self,
        client: aetcd.Client,
        cluster: str,
        bootstrap: Config,
        *,
        timeout: float,
        prepare: Callable[[Config], Config] | None = None,
        on_seen: Callable[[int], None] | None = None,
    ) -> None:
        """``bootstrap`` is the node's file config (with the command line's overrides, which
        ``prepare`` applies again to each revision); ``on_seen`` hears each revision looked at."""
        self.client = client
        self.key = config_key(cluster)
        self.name = f"etcd:{self.key.decode()}"
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._prepare = prepare
        self._on_seen = on_seen
        self._current = ConfigSnapshot(bootstrap, BOOTSTRAP_REVISION, self.name, "")
        #: The key's mod_revision last looked at, good or bad: not parsed twice.
        self._seen = BOOTSTRAP_REVISION
        self._changed = asyncio.Event()
        self.watch = PrefixWatch(client, self.key, on_change=self._on_change, timeout=timeout)
        self._started = False

    @property
    def current(self) -> ConfigSnapshot:
        return self._current

    def poke(self) -> None:
        self._changed.set()

    async def start(self) -> ConfigEvent | None:
        """The first read (bounded): what etcd holds, to apply before serving; ``None`` when there
        is nothing to apply (an empty key, or etcd unreachable: then ``updates`` keeps trying)."""
        try:
            await self.watch.start()
        except Exception as exc:
            log.warning("etcd unreachable at start; serving the bootstrap config until it answers",
                        extra={"fields": {"error": type(exc).__name__, "key": self.key.decode()}})
            return None
        self._started = True
        return await self._look()

    async def aclose(self) -> None:
        await self.watch.close()

    async def updates(self) -> AsyncIterator[ConfigEvent]:
        delay = 0.05
        while not self._started:  # etcd was down at start: keep trying, nothing else to do
            try:
                await self.watch.start()
                self._started = True
            except Exception as exc:
                raise_if_cancelling(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                event = await self._look()
            except Exception as exc:  # etcd went away between the event and the read: the last good stays
                raise_if_cancelling(exc)
                log.warning("could not read the cluster config; keeping the last good one", extra={"fields": {
                    "error": type(exc).__name__, "revision": self._current.revision}})
                await asyncio.sleep(BACKOFF_MAX)
                self._changed.set()
                continue
            if event is not None:
                yield event

    def _on_change(self, view: Mapping[bytes, bytes], _revision: int) -> None:
        self._changed.set()

    async def _look(self) -> ConfigEvent | None:
        got = await asyncio.wait_for(self.client.get(self.key), self.timeout)
        if got is None:
            if self._current.revision != BOOTSTRAP_REVISION and self._seen != -1:
                log.warning("the cluster config key is gone; keeping the config in force",
                            extra={"fields": {"key": self.key.decode(), "revision": self._current.revision}})
            self._seen = -1
            return None
        rev = int(got.mod_revision)
        if rev == self._seen or rev <= self._current.revision:
            return None
        self._seen = rev
        if self._on_seen is not None:
            self._on_seen(rev)
        raw: bytes = got.value
        digest = digest_of(raw)
        result = await asyncio.to_thread(self._parse, raw)
        if isinstance(result, ConfigError):
            return ConfigRejected(result, f"{self.name}@{rev}", digest)
        self._current = ConfigSnapshot(result, rev, self.name, digest)
        return self._current

    def _parse(self, raw: bytes) -> Config | ConfigError:
        try:
            cfg = node_local(config_from_bytes(raw), self.bootstrap)
            if self._prepare is not None:
                cfg = self._prepare(cfg)
        except ConfigError as exc:
            return exc
        except Exception as exc:  # parsing should raise nothing else; if it does, still keep serving
            log.exception("cluster config failed to load unexpectedly")
            return ConfigError(f"unexpected {type(exc).__name__} while loading")
        return cfg
