"""Usage by day, key, team and model: requests, tokens, cost.

Theory of operation: each settled call adds to one row keyed by
(UTC day, key id, team, public model, deployment). The deployment is the
``provider/model`` that answered (empty when none did): one public model may
be served at different prices, and the row says which. It comes from the
config, so rows stay bounded by days, keys and deployments. Rows are what
``/admin/usage`` answers from and what budgets are rebuilt from after a restart. ``UsageFile``
snapshots the whole ledger atomically; the access layer writes it every few
seconds and on shutdown, so a crash loses at most that interval. In a node
the loop hands only the changed rows to a background thread, which encodes
and writes the file. Rows older than the retention are dropped once a day.
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
#: A row's numbers, in ``UsageRow``'s field order: what crosses from the loop to the writer.
RowValues = tuple[int, int, int, int, int, int, float]


class UsageLedger:
    def __init__(self) -> None:
        self.rows: dict[RowKey, UsageRow] = {}
        #: Rows changed or dropped since the last ``take_changes``: all a write has to look at.
        self._changed: set[RowKey] = set()
        #: The oldest day the last ``prune`` kept; pruning again before it moves finds nothing.
        self._kept_from = ""

    @property
    def dirty(self) -> bool:
        return bool(self._changed)

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
        self._changed.add(k)

    def refuse(self, *, day: str, key: str, team: str, model: str) -> None:
        """A call refused by a rate limit or budget: it cost nothing, but the caller hit a wall."""
        k = (day, key, team, model, "")  # refused before any deployment was chosen
        r = self.rows.get(k)
        if r is None:
            r = self.rows[k] = UsageRow()
        r.refused += 1
        self._changed.add(k)

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
        if oldest == self._kept_from:
            return  # once a day is enough: the scan is over every row
        self._kept_from = oldest
        for k in [k for k in self.rows if k[0] < oldest]:
            del self.rows[k]
            self._changed.add(k)

    def take_changes(self) -> dict[RowKey, RowValues | None]:
        """The rows changed since the last call, as plain values (``None``: dropped).

        This is what a usage write costs the event loop: the rows that changed since the
        last write, not the whole ledger; the writer keeps its own copy of the rest.
        """
        rows = self.rows
        out: dict[RowKey, RowValues | None] = {}
        for k in self._changed:
            r = rows.get(k)
            out[k] = None if r is None else (
                r.requests, r.refused, r.errors, r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cost_usd)
        self._changed = set()
        return out

    def values(self) -> dict[RowKey, RowValues]:
        """Every row as plain values (start-up, tests)."""
        return {k: (r.requests, r.refused, r.errors, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                    r.cost_usd) for k, r in self.rows.items()}

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


_VALUE_FIELDS = ("requests", "refused", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


def encode_rows(rows: dict[RowKey, RowValues]) -> bytes:
    """The ledger file: every row, sorted, as ``UsageLedger.query`` shows them."""
    out = []
    for (day, k, t, m, dep), v in sorted(rows.items()):
        row: dict[str, Any] = {"day": day, "key": k, "team": t, "model": m, "deployment": dep,
                               **dict(zip(_VALUE_FIELDS, v, strict=True))}
        row["total_tokens"] = v[3] + v[4]
        row["cost_usd"] = round(v[6], 8)
        out.append(row)
    return orjson.dumps({"version": 1, "rows": out})


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
    """The ledger's file, written whole and atomically.

    The loop hands over only the rows that changed (``UsageLedger.take_changes``);
    the writer folds them into its own copy of the ledger and encodes the file from
    that. With ``write_behind`` the writer is a ``WriteBehind`` thread, so neither the
    encoding of a large ledger nor the fsync runs on the loop; without (the CLI) it
    runs inline before ``save`` returns.
    """

    def __init__(self, path: str | os.PathLike[str], *, write_behind: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._mutex = threading.Lock()
        #: Changes handed over and not yet folded in, oldest first.
        self._deltas: list[dict[RowKey, RowValues | None]] = []
        #: The writer's copy of the ledger (only the writer touches it after ``load``).
        self._rows: dict[RowKey, RowValues] = {}
        #: Folded in but not yet on disk (the last write failed).
        self._unwritten = False
        self._writer = WriteBehind("usage", self._write) if write_behind else None

    def load(self, ledger: UsageLedger) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        ledger.load(data)
        self._rows = ledger.values()

    def save(self, ledger: UsageLedger) -> None:
        changes = ledger.take_changes()
        if not changes:
            return
        with self._mutex:
            self._deltas.append(changes)
        if self._writer is not None:
            self._writer.submit()
        else:
            self._write()

    def _write(self) -> None:
        with self._mutex:
            deltas, self._deltas = self._deltas, []
        rows = self._rows
        for changes in deltas:
            for k, v in changes.items():
                if v is None:
                    rows.pop(k, None)
                else:
                    rows[k] = v
        if not deltas and not self._unwritten:
            return
        self._unwritten = True
        atomic_write(self.path, encode_rows(rows))
        self._unwritten = False

    def wait_written(self, timeout: float) -> bool:
        """Block until the latest changes are on disk (``False`` at the timeout); not on the loop."""
        return self._writer.flush(timeout) if self._writer is not None else True
