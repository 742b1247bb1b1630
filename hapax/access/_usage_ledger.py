"""Usage by day, key, team and model: requests, tokens, cost.

Theory of operation: each settled call adds to one row keyed by
(UTC day, key id, team, public model, deployment). The deployment is the
``provider/model`` that answered (empty when none did): one public model may
be served at different prices, and the row says which. It comes from the
config, so rows stay bounded by days, keys and deployments. Rows are what
``/admin/usage`` answers from and what budgets are rebuilt from after a restart. ``UsageFile``
snapshots the whole ledger atomically; the access layer writes it every few
seconds (in a node from a background thread) and on shutdown, so a crash
loses at most that interval. Rows older
than the retention are dropped on each snapshot.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from .._files import atomic_write
from .._write_behind import WriteBehind
from ..state import day_of

ROW_FIELDS = (
    "day", "key", "team", "model", "deployment", "requests", "refused", "errors",
    "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "cost_usd",
)


@dataclass(slots=True)
class UsageRow:
    #: Calls admitted and settled; a refusal (429 for a limit or budget) is counted in ``refused``.
    requests: int = 0
    refused: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0


RowKey = tuple[str, str, str, str, str]  # day, key, team, model, deployment


class UsageLedger:
    def __init__(self) -> None:
        self.rows: dict[RowKey, UsageRow] = {}
        self.dirty = False

    def record(
        self, *, day: str, key: str, team: str, model: str, deployment: str = "",
        prompt: int, completion: int, cached: int, cost: float, error: bool,
    ) -> None:
        k = (day, key, team, model, deployment)
        r = self.rows.get(k)
        if r is None:
            r = self.rows[k] = UsageRow()
        r.requests += 1
        r.errors += int(error)
        r.prompt_tokens += prompt
        r.completion_tokens += completion
        r.cached_tokens += cached
        r.cost_usd += cost
        self.dirty = True

    def refuse(self, *, day: str, key: str, team: str, model: str) -> None:
        """A call refused by a rate limit or budget: it cost nothing, but the caller hit a wall."""
        k = (day, key, team, model, "")  # refused before any deployment was chosen
        r = self.rows.get(k)
        if r is None:
            r = self.rows[k] = UsageRow()
        r.refused += 1
        self.dirty = True

    def query(
        self, *, key: str | None = None, team: str | None = None, model: str | None = None,
        since: str | None = None, until: str | None = None, deployment: str | None = None,
    ) -> list[dict[str, Any]]:
        """Rows matching every filter given; ``since``/``until`` are inclusive ``YYYY-MM-DD``."""
        out = []
        for (day, k, t, m, dep), r in sorted(self.rows.items()):
            if key is not None and k != key:
                continue
            if team is not None and t != team:
                continue
            if model is not None and m != model:
                continue
            if deployment is not None and dep != deployment:
                continue
            if since is not None and day < since:
                continue
            if until is not None and day > until:
                continue
            row: dict[str, Any] = {"day": day, "key": k, "team": t, "model": m, "deployment": dep, **asdict(r)}
            row["total_tokens"] = r.prompt_tokens + r.completion_tokens
            row["cost_usd"] = round(r.cost_usd, 8)
            out.append(row)
        return out

    def prune(self, *, now: float, retention_days: int) -> None:
        oldest = day_of(now - retention_days * 86400)
        for k in [k for k in self.rows if k[0] < oldest]:
            del self.rows[k]

    def dump(self) -> bytes:
        return orjson.dumps({"version": 1, "rows": self.query()})

    def load(self, data: bytes) -> None:
        doc = orjson.loads(data)
        for row in doc.get("rows", []):
            # Files written before rows had a deployment load as "" (unknown).
            k = (row["day"], row["key"], row["team"], row["model"], row.get("deployment", ""))
            self.rows[k] = UsageRow(
                requests=int(row["requests"]), refused=int(row.get("refused", 0)),
                errors=int(row.get("errors", 0)),
                prompt_tokens=int(row["prompt_tokens"]), completion_tokens=int(row["completion_tokens"]),
                cached_tokens=int(row.get("cached_tokens", 0)), cost_usd=float(row["cost_usd"]),
            )


#: What rows can be grouped by; the other dimensions are summed over.
GROUPS = ("day", "key", "team", "model", "deployment")
SUMS = ("requests", "refused", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
        "total_tokens", "cost_usd")


def group(rows: list[dict[str, Any]], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """``rows`` summed per distinct value of the ``by`` dimensions (a subset of ``GROUPS``)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        k = tuple(r[d] for d in by)
        g = out.get(k)
        if g is None:
            g = out[k] = {**{d: r[d] for d in by}, **dict.fromkeys(SUMS, 0)}
        for f in SUMS:
            g[f] += r[f]
    for g in out.values():
        g["cost_usd"] = round(g["cost_usd"], 8)
    return [out[k] for k in sorted(out)]


def to_csv(rows: list[dict[str, Any]], fields: tuple[str, ...] = ROW_FIELDS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


class UsageFile:
    """The ledger's file. With ``write_behind`` the loop only encodes the snapshot (CPU, no
    I/O) and a ``WriteBehind`` thread writes the newest one: snapshots queued behind a slow
    disk are replaced, not stacked."""

    def __init__(self, path: str | os.PathLike[str], *, write_behind: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._mutex = threading.Lock()
        self._latest: bytes | None = None
        self._writer = WriteBehind("usage", self._write) if write_behind else None

    def load(self, ledger: UsageLedger) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        ledger.load(data)

    def save(self, ledger: UsageLedger) -> None:
        data = ledger.dump()
        ledger.dirty = False
        with self._mutex:
            self._latest = data
        if self._writer is not None:
            self._writer.submit()
        else:
            self._write()

    def _write(self) -> None:
        with self._mutex:
            data, self._latest = self._latest, None
        if data is None:
            return
        try:
            atomic_write(self.path, data)
        except BaseException:
            with self._mutex:
                if self._latest is None:  # nothing newer came meanwhile: retry this one
                    self._latest = data
            raise

    def wait_written(self, timeout: float) -> bool:
        """Block until the newest snapshot is on disk (``False`` at the timeout); not on the loop."""
        return self._writer.flush(timeout) if self._writer is not None else True
