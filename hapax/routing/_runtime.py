"""A config in force: one immutable snapshot plus what is built from it.

Theory of operation: the gateway holds exactly one current ``Runtime``. A
request takes it once, at its start, and uses only it until it settles: the
routes (``models``), the prices, limits, budgets and strategies in
``config``, all from one ``ConfigSnapshot`` with one revision (access control
prices a call by the config of the runtime it was admitted on).
It takes a reference (``acquire``) and gives it back at its end, so it
finishes on the config it started with even if a reload swaps in a new one
meanwhile. A reload builds the next runtime, reusing every provider
whose config did not change (their connection pools stay warm), and retires
the old one; providers nobody uses any more are closed once the last request
holding the old runtime ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .._transport import Transport
from ..config import Config, ConfigSnapshot, ModelConfig, ProviderConfig, Secrets
from ..providers import Provider, build_provider
from ._table import aliases

TransportFactory = Callable[[str, ProviderConfig], Transport]


class Runtime:
    def __init__(
        self,
        snapshot: ConfigSnapshot,
        *,
        generation: int,
        transport_factory: TransportFactory,
        previous: Runtime | None = None,
        secrets: Secrets | None = None,
        fresh: bool = False,
    ) -> None:
        """``secrets`` holds the keys read from ``api_key_file``s (``hapax.config._secrets``);
        ``fresh`` builds every provider anew (a reload: credentials and CA bundles read again)."""
        config = snapshot.config
        self.snapshot = snapshot
        self.config: Config = config
        #: The snapshot's revision (the source's number); ``generation`` counts runtimes here.
        self.revision = snapshot.revision
        #: ``x-hapax-config-revision``, formatted once.
        self.revision_header = str(snapshot.revision)
        self.generation = generation
        self.providers: dict[str, Provider] = {}
        for name, pcfg in config.providers.items():
            key = secrets.get(name) if secrets is not None and pcfg.api_key_file is not None else None
            if key is not None:
                pcfg = pcfg.model_copy(update={"api_key": key})
            old = previous.providers.get(name) if previous and not fresh else None
            if old is not None and old.config == pcfg:
                self.providers[name] = old
            else:
                self.providers[name] = build_provider(name, pcfg, transport_factory(name, pcfg))
        #: The route table's first column: public name (or alias) to model (``_table``).
        self.models: dict[str, ModelConfig] = aliases(config)
        self._active = 0
        self._retired_to: Runtime | None = None
        self._closing: list[asyncio.Task[None]] = []

    def acquire(self) -> None:
        self._active += 1

    def release(self) -> None:
        self._active -= 1
        if self._active == 0 and self._retired_to is not None:
            self._close_unused()

    def retire(self, successor: Runtime | None) -> None:
        self._retired_to = successor
        if self._active == 0:
            self._close_unused()

    def _close_unused(self) -> None:
        keep = set(map(id, self._retired_to.providers.values())) if self._retired_to else set()
        for p in self.providers.values():
            if id(p) not in keep:
                self._closing.append(asyncio.get_running_loop().create_task(p.aclose()))
        self.providers = {}

    async def aclose(self) -> None:
        for p in self.providers.values():
            await p.aclose()
        self.providers = {}
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
