"""Access control's state and lifecycle: the stores, config changes, and flushing the usage ledger."""


from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import private_dir
from ..config import Config, default_config
from ..state import AccessState, MemoryState, day_of, month_of
from ._audit import Audit, QueuedAudit, make_audit
from ._keys import FileKeyStore, KeyStore, MemoryKeyStore, hash_secret
from ._pricing import PriceTable
from ._usage_ledger import UsageFile, UsageLedger

if TYPE_CHECKING:
    from .._metrics import GatewayMetrics
    from ._usage_redis import RedisUsage

log = logging.getLogger("hapax.access")

#: Seconds a shutdown waits for keys, usage and audit to reach the disk: long enough for any
#: healthy disk, short enough that a stuck one cannot hold the exit past a pod's grace period.
WRITE_FLUSH_TIMEOUT = 5.0


class AccessCore:
    """The state access control keeps (keys, usage, budgets, limits, audit) and its lifecycle."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        announce: bool = True,
        state: AccessState | None = None,
        write_behind: bool = False,
        keys: KeyStore | None = None,
        usage: RedisUsage | None = None,
    ) -> None:
        """``state``, ``keys`` and ``usage``: shared with the cluster when the composition root
        builds them on Redis (``hapax.state``, ``_keys_redis``, ``_usage_redis``); with ``keys``
        and ``usage`` given, ``state_dir`` holds the audit log only."""
        cfg = config or default_config()
        self.config = cfg
        self._now = wall_clock
        self._mono = monotonic
        sdir = state_dir if state_dir is not None else cfg.auth.state_dir
        self.state_dir = Path(sdir) if sdir else None
        #: Key, usage and audit writes on background threads (a node); inline for the CLI.
        self.write_behind = write_behind
        self.keys: KeyStore
        self.audit: Audit
        self._usage_file: UsageFile | None = None
        #: Permission bits of the state directory as found (``None``: no state directory).
        self.state_dir_mode = private_dir(self.state_dir) if self.state_dir is not None else None
        if keys is not None:
            self.keys = keys
        elif self.state_dir is not None:
            self.keys = FileKeyStore(self.state_dir / "keys", write_behind=write_behind)
        else:
            self.keys = MemoryKeyStore()
        #: Usage shared with the cluster; ``None`` keeps it here (``usage.json`` or memory).
        self.shared_usage = usage
        if usage is None and self.state_dir is not None:
            self._usage_file = UsageFile(self.state_dir / "usage.json", write_behind=write_behind)
        self.keys.on_change = self._bind_teams
        self.audit = make_audit(cfg, self.state_dir, write_behind=write_behind)
        self.ledger = usage.ledger if usage is not None else UsageLedger()
        #: Limits, concurrency and budgets: built by the composition root (memory by default).
        self.state: AccessState = state or MemoryState(monotonic=monotonic, wall_clock=wall_clock)
        if self._usage_file is not None:
            self._usage_file.load(self.ledger)
            self._rebuild_budgets()
        self.prices = PriceTable(cfg.pricing)
        self.metrics: GatewayMetrics | None = None
        self._admin_digest: str | None = None
        self._exhausted: set[tuple[str, str, str, str]] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self.started_at = self._now()
        self.node_id = f"{socket.gethostname()}:{os.getpid()}"
        #: Set by a node in a cluster: ``GET /admin/cluster`` answers with what it returns.
        self.cluster_view: Callable[[], dict[str, Any]] | None = None
        #: Reject allowlists naming models the config lacks (off for the CLI without --config).
        self.check_models = True
        self._configure(cfg)
        if announce:
            self._announce()

    # -- lifecycle and flushing ---------------------------------------------------------------------

    def _configure(self, cfg: Config) -> None:
        self.config = cfg
        self.prices = PriceTable(cfg.pricing)
        if self.shared_usage is not None:
            self.shared_usage.configure(retention_days=cfg.usage.retention_days,
                                        flush_interval=cfg.usage.flush_seconds(shared=True))
        key = cfg.auth.admin_key
        self._admin_digest = hash_secret(key.get_secret_value()) if key is not None else None
        self._bind_teams()

    def _announce(self) -> None:
        cfg = self.config
        if cfg.auth.mode == "none":
            log.warning(
                "AUTH IS OFF (auth.mode: none): anyone who can reach this port can call every model. "
                "Set auth.mode: keys before exposing it.",
            )
        elif self.state_dir is None and self.shared_usage is not None:
            log.warning("auth.state_dir is unset: the audit log lives in memory and dies with the process "
                        "(keys and usage are in Redis)")
        elif self.state_dir is None:
            log.warning("auth.state_dir is unset: API keys, usage and audit live in memory and die with the process")
        if self.state_dir_mode is not None and self.state_dir_mode & 0o077:
            log.warning(
                "auth.state_dir %s is open to group or others (mode %o); "
                "it holds key hashes, usage and the audit log: chmod 700 it",
                self.state_dir, self.state_dir_mode,
            )
        self.audit.record(
            "gateway.started", actor="system",
            details={"auth_mode": cfg.auth.mode, "node": self.node_id,
                     "state_dir": str(self.state_dir) if self.state_dir else None},
        )

    def attach(self, metrics: GatewayMetrics) -> None:
        """Count into the gateway's metrics registry."""
        self.metrics = metrics
        if isinstance(self.audit, QueuedAudit):
            self.audit.on_drop = metrics.audit_dropped.inc
        self._bind_teams()

    def _bind_teams(self) -> None:
        if self.metrics is not None:
            teams = set(self.config.teams) | {r.team for r in self.keys.all() if r.team}
            self.metrics.bind_teams(teams)

    def apply(self, config: Config, *, actor: str = "config-file") -> None:
        """A new config is in force: reprice, re-limit, and record what changed."""
        old = self.config
        changed = sorted(
            name for name in type(config).model_fields if getattr(old, name) != getattr(config, name)
        )
        self._configure(config)
        if changed:
            self.audit.record("config.applied", actor=actor, details={"changed_sections": changed})
        if old.auth.mode != config.auth.mode:
            self.audit.record("config.auth_mode_changed", actor=actor,
                              details={"from": old.auth.mode, "to": config.auth.mode})
            if config.auth.mode == "none":
                self._announce()

    def flush(self) -> None:
        """Write usage and last-used times; safe to call any time."""
        self._flush_handle = None
        now = self._now()
        self.ledger.prune(now=now, retention_days=self.config.usage.retention_days)
        self.state.housekeeping(now=now)
        if self._usage_file is not None and self.ledger.dirty:
            self._usage_file.save(self.ledger)
        self.keys.flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None or self._usage_file is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_handle = loop.call_later(self.config.usage.flush_seconds(shared=False), self.flush)

    async def start(self) -> None:
        """Load shared stores (keys, usage); call once the event loop runs, before serving."""
        await self.keys.start()
        if self.shared_usage is not None:
            await self.shared_usage.start()

    async def aclose(self, *, timeout: float = WRITE_FLUSH_TIMEOUT) -> None:
        """Write everything out: usage, last-used times, the audit queue; a stuck disk gets
        ``timeout`` seconds in all, then what is left is named in the log, not waited for."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
        await self.keys.aclose()
        if self.shared_usage is not None:
            await self.shared_usage.aclose()
        if self.write_behind:
            await asyncio.to_thread(self._wait_written, timeout)
        self.audit.close()
        await self.state.aclose()

    def _wait_written(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        stores: list[tuple[str, Callable[[float], bool]]] = [("audit", self.audit.wait_written)]
        if isinstance(self.keys, FileKeyStore):
            stores.append(("keys", self.keys.wait_written))
        if self._usage_file is not None:
            stores.append(("usage", self._usage_file.wait_written))
        for name, wait in stores:
            if not wait(max(0.0, deadline - time.monotonic())):
                log.error("%s: not everything was written before shutdown (the disk did not answer)", name)

    async def usage_rows(self, **filters: Any) -> list[dict[str, Any]]:
        """Usage rows matching ``filters`` (``UsageLedger.query``'s): the cluster's when shared."""
        if self.shared_usage is not None:
            return await self.shared_usage.query(**filters)
        return self.ledger.query(**filters)

    def _rebuild_budgets(self) -> None:
        now = self._now()
        today, month = day_of(now), month_of(now)
        for row in self.ledger.query(since=month + "-01"):
            tokens, usd = row["total_tokens"], row["cost_usd"]
            for kind, id in (("key", row["key"]), ("team", row["team"])):
                if not id:
                    continue
                self.state.restore_spent(kind, id, month, tokens, usd)
                if row["day"] == today:
                    self.state.restore_spent(kind, id, today, tokens, usd)
