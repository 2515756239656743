"""The aggregator's ledger: runs, agents, rounds, accepted and rejected updates, run state.

One SQLite file in the state directory, in WAL mode with ``synchronous=FULL``: every call that
writes has committed (and the WAL is synced) when it returns. A crash right after a call returns
never loses that row; on reopen SQLite replays the WAL. The one exception is
``record_updates(rows, sync=False)``, the intake's group of accepted updates: its rows are
durable in the round's update log before the transaction begins (:mod:`aggregator.store.updatelog`),
so it commits without a sync; a power cut may lose that transaction (never a part of it, nor any
write before it), and the intake rebuilds its rows from the log on restart. Any later synced
write syncs the WAL up to it.

One writer at a time: the connection is shared between threads (``check_same_thread=False``)
behind a lock. Other processes (``edgefed-aggregator status``) may open the same file and read
while the service writes; WAL lets them.

Tables (schema version :data:`SCHEMA_VERSION` in ``PRAGMA user_version``; the file is marked
with ``PRAGMA application_id``; DDL, checks on open and row classes in
:mod:`aggregator.store._ledger_schema`)::

    runs(run_id PK, method, config JSON, created_at)
    agents(agent_id PK, profile JSON, first_seen, last_seen)
    rounds(run_id, round, method, started_at, committed_at?, checkpoint_sha256?, metrics JSON,
           assigned JSON)                                     PK (run_id, round)
    updates(run_id, round, task_id PK, agent_id, sha256, num_examples, metrics JSON, bytes_up,
            bytes_down, received_at, blob_path?, blob_offset?, blob_length?)
                                                              FK (run_id, round) -> rounds
    rejections(id PK, run_id, round, task_id, agent_id, code, reason, at)
    state(run_id, key, value JSON)                            PK (run_id, key)

Evaluation rows (every evaluation of a global, round 0 included: per agent its metrics and
examples, and the example-weighted aggregate) are kept in ``state`` under ``eval/<round>``
(:meth:`Ledger.record_eval`, :meth:`Ledger.evals`), so they need no schema change.

JSON columns are written with ``allow_nan=False``: a NaN never reaches the ledger.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator.errors import DiskFull, StateError
from aggregator.store._ledger_schema import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    AgentRow,
    RejectionRow,
    RoundRow,
    UpdateRow,
    prepare,
)
from aggregator.store._ledger_schema import decode_row as _decode
from aggregator.store._ledger_schema import dumps as _dumps

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AgentRow",
    "Ledger",
    "RejectionRow",
    "RoundRow",
    "UpdateRow",
]

logger = logging.getLogger(__name__)

RUN_SECTIONS = ("run", "method")
"""A run's own sections of its config (the rest is the service's)."""


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf where two JSON values (e.g. two configs' dumps)
    differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


_EVAL = "eval/"


class Ledger:
    """The aggregator's durable record; see the module docstring. Also a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the ledger {self.path}: {e}") from e
        self._conn.row_factory = sqlite3.Row
        try:
            self._open()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # ------------------------------------------------------------------ plumbing

    def _open(self) -> None:
        mode, created = prepare(self._c(), self.path)
        if created:
            logger.info("created ledger %s (schema %d)", self.path, SCHEMA_VERSION)
        if mode.lower() != "wal":
            logger.warning("ledger %s: no WAL mode here, journal mode is %s", self.path, mode)

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"the ledger {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (and synced) when the block ends without error."""
        with self._lock:
            conn = self._c()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as e:
                if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise DiskFull(f"ledger {self.path}: no space left on the device") from e
                raise StateError(f"ledger {self.path}: {e}") from e

    def _all(self, sql: str, *args: object) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._c().execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise StateError(f"ledger {self.path}: {e}") from e

    def _one(self, sql: str, *args: object) -> sqlite3.Row | None:
        rows = self._all(sql, *args)
        return rows[0] if rows else None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def create_run(self, run_id: str, method: str, config: dict[str, Any]) -> None:
        """Record a new run; a second call with the same run id and method is a no-op."""
        blob = _dumps(config, f"the config of run {run_id}")
        with self._write() as c:
            row = c.execute("SELECT method, config FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?)", (run_id, method, blob, time.time())
                )
            elif row["method"] != method:
                raise StateError(
                    f"run {run_id!r} exists with method {row['method']!r}, not {method!r}"
                )
            else:
                first = json.loads(row["config"])
                changed = [  # a run's own settings; the service's may change between starts
                    f"{key} ({a!r} then, {b!r} now)"
                    for key, a, b in differences(
                        {k: first.get(k) for k in RUN_SECTIONS},
                        {k: config.get(k) for k in RUN_SECTIONS},
                    )
                ]
                if changed:
                    logger.warning(
                        "run %s resumed with settings that differ from those it was started "
                        "with, which the ledger keeps: %s",
                        run_id,
                        "; ".join(changed),
                    )

    def run(self, run_id: str) -> dict[str, Any] | None:
        """``{"run_id", "method", "config", "created_at"}`` of a run, or None."""
        row = self._one("SELECT * FROM runs WHERE run_id=?", run_id)
        return None if row is None else _decode(row, "config")

    def run_ids(self) -> list[str]:
        """Every run id, in the order the runs were created."""
        return [str(r[0]) for r in self._all("SELECT run_id FROM runs ORDER BY rowid")]

    def latest_run(self) -> str | None:
        """The run id created last, or None."""
        row = self._one("SELECT run_id FROM runs ORDER BY rowid DESC LIMIT 1")
        return None if row is None else str(row[0])

    # ------------------------------------------------------------------ agents

    def upsert_agent(self, agent_id: str, profile: dict[str, Any], now: float) -> None:
        """Insert an agent or replace its profile; ``first_seen`` is kept."""
        blob = _dumps(profile, f"the profile of agent {agent_id}")
        with self._write() as c:
            c.execute(
                "INSERT INTO agents VALUES (?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET "
                "profile=excluded.profile, last_seen=max(last_seen, excluded.last_seen)",
                (agent_id, blob, now, now),
            )

    def touch_agent(self, agent_id: str, now: float) -> None:
        """Move an agent's ``last_seen`` forward to ``now``."""
        with self._write() as c:
            sql = "UPDATE agents SET last_seen=max(last_seen, ?) WHERE agent_id=?"
            if c.execute(sql, (now, agent_id)).rowcount == 0:
                raise StateError(f"agent {agent_id!r} is not in the ledger")

    def agents(self) -> list[AgentRow]:
        rows = self._all("SELECT * FROM agents ORDER BY agent_id")
        return [AgentRow(**_decode(r, "profile")) for r in rows]

    # ------------------------------------------------------------------ rounds

    def begin_round(
        self, run_id: str, round: int, method: str, assigned: list[str], now: float
    ) -> None:
        """Open a round. Again after a restart: agents newly assigned are added to the list."""
        with self._write() as c:
            if c.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is None:
                raise StateError(f"run {run_id!r} is not in the ledger")
            row = c.execute(
                "SELECT * FROM rounds WHERE run_id=? AND round=?", (run_id, round)
            ).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, ?, NULL, NULL, '{}', ?)",
                    (run_id, round, method, now, _dumps(list(assigned), "assigned agents")),
                )
                return
            if row["method"] != method:
                raise StateError(f"round {round} of {run_id!r} began with method {row['method']!r}")
            if row["committed_at"] is not None:
                raise StateError(f"round {round} of {run_id!r} is already committed")
            merged: list[str] = json.loads(row["assigned"])
            merged += [a for a in assigned if a not in merged]
            c.execute(
                "UPDATE rounds SET assigned=? WHERE run_id=? AND round=?",
                (_dumps(merged, "assigned agents"), run_id, round),
            )

    @staticmethod
    def _round(c: sqlite3.Connection, run_id: str, round: int) -> sqlite3.Row:
        row = c.execute("SELECT * FROM rounds WHERE run_id=? AND round=?", (run_id, round))
        found: sqlite3.Row | None = row.fetchone()
        if found is None:
            raise StateError(f"round {round} of run {run_id!r} was never begun")
        return found

    def record_update(self, row: UpdateRow) -> bool:
        """Record an accepted update; False (nothing written) if its task id is already there."""
        return self.record_updates([row])[0]

    def record_updates(self, rows: list[UpdateRow], *, sync: bool = True) -> list[bool]:
        """Record a group of accepted updates in one transaction (one sync); per row, False
        (nothing written) if its task id is already there.

        ``sync=False``: the caller has made the rows durable elsewhere already (a round's update
        log, which rebuilds them after a crash): the transaction is committed without a sync
        (``synchronous=NORMAL``). The next synced write syncs it with everything before it."""
        with self._lock:
            if sync:
                return self._record_updates(rows)
            self._c().execute("PRAGMA synchronous=NORMAL")
            try:
                return self._record_updates(rows)
            finally:
                self._c().execute("PRAGMA synchronous=FULL")

    def _record_updates(self, rows: list[UpdateRow]) -> list[bool]:
        inserted: list[bool] = []
        with self._write() as c:
            open_rounds: set[tuple[str, int]] = set()
            for row in rows:
                key = (row.run_id, row.round)
                if key not in open_rounds:
                    if self._round(c, *key)["committed_at"] is not None:
                        raise StateError(
                            f"round {row.round} of run {row.run_id!r} is already committed"
                        )
                    open_rounds.add(key)
                values = dict(
                    vars(row), metrics=_dumps(row.metrics, f"metrics of task {row.task_id}")
                )
                names = ", ".join(values)
                marks = ", ".join(f":{k}" for k in values)
                sql = f"INSERT INTO updates ({names}) VALUES ({marks}) ON CONFLICT(task_id) DO NOTHING"
                inserted.append(c.execute(sql, values).rowcount == 1)
        return inserted

    def has_update(self, task_id: str) -> bool:
        return self._one("SELECT 1 FROM updates WHERE task_id=?", task_id) is not None

    def updates(self, run_id: str, round: int) -> list[UpdateRow]:
        """Accepted updates of a round, in the order they were recorded."""
        sql = "SELECT * FROM updates WHERE run_id=? AND round=? ORDER BY rowid"
        return [UpdateRow(**_decode(r, "metrics")) for r in self._all(sql, run_id, round)]

    def record_rejection(self, row: RejectionRow) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO rejections (run_id, round, task_id, agent_id, code, reason, at) "
                "VALUES (:run_id, :round, :task_id, :agent_id, :code, :reason, :at)",
                vars(row),
            )

    def rejections(self, run_id: str, round: int | None = None) -> list[RejectionRow]:
        """Rejections of a run (of one round if given), in the order they were recorded."""
        sql = "SELECT run_id, round, task_id, agent_id, code, reason, at FROM rejections "
        if round is None:
            rows = self._all(sql + "WHERE run_id=? ORDER BY id", run_id)
        else:
            rows = self._all(sql + "WHERE run_id=? AND round=? ORDER BY id", run_id, round)
        return [RejectionRow(**_decode(r)) for r in rows]

    def commit_round(
        self, run_id: str, round: int, checkpoint_sha256: str, metrics: dict[str, Any], now: float
    ) -> None:
        """Mark a round committed with its checkpoint hash; again with the same hash is a no-op."""
        blob = _dumps(metrics, f"metrics of round {round}")
        with self._write() as c:
            row = self._round(c, run_id, round)
            if row["committed_at"] is not None:
                if row["checkpoint_sha256"] != checkpoint_sha256:
                    raise StateError(
                        f"round {round} of {run_id!r} is already committed with checkpoint "
                        f"{row['checkpoint_sha256']}, not {checkpoint_sha256}"
                    )
                return
            c.execute(
                "UPDATE rounds SET committed_at=?, checkpoint_sha256=?, metrics=? "
                "WHERE run_id=? AND round=?",
                (now, checkpoint_sha256, blob, run_id, round),
            )

    def set_round_metrics(self, run_id: str, round: int, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` into a round's metrics (keys given replace keys stored)."""
        with self._write() as c:
            merged = json.loads(self._round(c, run_id, round)["metrics"]) | metrics
            c.execute(
                "UPDATE rounds SET metrics=? WHERE run_id=? AND round=?",
                (_dumps(merged, f"metrics of round {round}"), run_id, round),
            )

    def last_committed_round(self, run_id: str) -> int | None:
        sql = "SELECT max(round) FROM rounds WHERE run_id=? AND committed_at IS NOT NULL"
        row = self._one(sql, run_id)
        return None if row is None or row[0] is None else int(row[0])

    def rounds(self, run_id: str) -> list[RoundRow]:
        rows = self._all("SELECT * FROM rounds WHERE run_id=? ORDER BY round", run_id)
        return [RoundRow(**_decode(r, "metrics", "assigned")) for r in rows]

    # ------------------------------------------------------------------ run state

    def put_state(self, run_id: str, key: str, value: object) -> None:
        """Store a JSON value under ``(run_id, key)``, replacing any previous one."""
        blob = _dumps(value, f"state {key!r} of run {run_id}")
        with self._write() as c:
            c.execute(
                "INSERT INTO state VALUES (?, ?, ?) "
                "ON CONFLICT(run_id, key) DO UPDATE SET value=excluded.value",
                (run_id, key, blob),
            )

    def get_state(self, run_id: str, key: str, default: object = None) -> object:
        row = self._one("SELECT value FROM state WHERE run_id=? AND key=?", run_id, key)
        return default if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ evaluations

    def record_eval(
        self,
        run_id: str,
        round: int,
        agents: dict[str, dict[str, float]],
        aggregate: dict[str, float],
    ) -> None:
        """Store the evaluation of round ``round``'s global: per agent (its metrics and
        ``examples``) and the aggregate; a later call for the same round replaces it."""
        self.put_state(
            run_id, f"{_EVAL}{round}", {"round": round, "agents": agents, "aggregate": aggregate}
        )

    def evals(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored evaluation of the run, by round: ``{"round", "agents", "aggregate"}``."""
        rows = self._all(
            "SELECT value FROM state WHERE run_id=? AND key LIKE ?", run_id, f"{_EVAL}%"
        )
        found: list[dict[str, Any]] = [json.loads(r[0]) for r in rows]
        return sorted(found, key=lambda e: int(e["round"]))
