"""The ledger's SQLite schema and rows: the DDL, the version checks on open, the row dataclasses
and the JSON column codec.

Used by :mod:`aggregator.store.ledger` (which re-exports the constants and rows and documents the
tables). :func:`prepare` sets the connection's pragmas, creates the schema in an empty file and
refuses a file that is not an edgefed ledger, has another schema version or fails SQLite's
``quick_check``; every refusal is a :class:`~aggregator.errors.StateError`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.errors import DiskFull, StateError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA",
    "SCHEMA_VERSION",
    "AgentRow",
    "RejectionRow",
    "RoundRow",
    "UpdateRow",
    "decode_row",
    "dumps",
    "prepare",
]

SCHEMA_VERSION = 2
"""2: ``updates.blob_offset`` and ``blob_length`` (a payload in a round's update log); a version 1
ledger is migrated on open (the two columns added, NULL: a payload in a file of its own)."""
APPLICATION_ID = 0x45464544  # "EFED"

SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, method TEXT NOT NULL, config TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY, profile TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id), round INTEGER NOT NULL, method TEXT NOT NULL,
    started_at REAL NOT NULL, committed_at REAL, checkpoint_sha256 TEXT,
    metrics TEXT NOT NULL, assigned TEXT NOT NULL, PRIMARY KEY (run_id, round)
);
CREATE TABLE updates (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, task_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL, sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL,
    received_at REAL NOT NULL, blob_path TEXT, blob_offset INTEGER, blob_length INTEGER,
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round)
);
CREATE INDEX updates_by_round ON updates(run_id, round);
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, round INTEGER NOT NULL,
    task_id TEXT NOT NULL, agent_id TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX rejections_by_round ON rejections(run_id, round);
CREATE TABLE state (
    run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key)
);
"""


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    profile: dict[str, Any]
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class UpdateRow:
    run_id: str
    round: int
    task_id: str
    agent_id: str
    sha256: str
    num_examples: int
    metrics: dict[str, Any]
    bytes_up: int
    bytes_down: int
    received_at: float
    blob_path: str | None = None
    blob_offset: int | None = None
    """Where the payload starts in ``blob_path`` (an update log); None: the whole file."""
    blob_length: int | None = None


@dataclass(frozen=True)
class RejectionRow:
    run_id: str
    round: int
    task_id: str
    agent_id: str
    code: str
    reason: str
    at: float


@dataclass(frozen=True)
class RoundRow:
    run_id: str
    round: int
    method: str
    started_at: float
    committed_at: float | None
    checkpoint_sha256: str | None
    metrics: dict[str, Any]
    assigned: list[str]


def decode_row(row: sqlite3.Row, *json_columns: str) -> dict[str, Any]:
    """A row as a dict, with the named JSON columns parsed."""
    return {k: json.loads(row[k]) if k in json_columns else row[k] for k in row.keys()}  # noqa: SIM118


def dumps(value: object, what: str) -> str:
    """``value`` as the text of a JSON column (sorted keys, no NaN); ``what`` names it in errors."""
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StateError(f"cannot store {what} in the ledger: {e}") from e


def prepare(conn: sqlite3.Connection, path: Path) -> tuple[str, bool]:
    """Set the pragmas of a fresh connection to the ledger at ``path``, create the schema if the
    file is empty and check it otherwise; (the journal mode SQLite granted, whether created)."""
    created = False
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and tables == 0:
            # one transaction: a failure leaves it open and closing the connection undoes it
            pragmas = (
                f"PRAGMA application_id={APPLICATION_ID};PRAGMA user_version={SCHEMA_VERSION};"
            )
            conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}{pragmas}COMMIT;")
            created = True
        elif app_id != APPLICATION_ID:
            raise StateError(f"{path} is an SQLite file but not an edgefed ledger")
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"the ledger {path} has schema version {version}, newer than this "
                f"edgefed supports ({SCHEMA_VERSION}); upgrade edgefed to open it"
            )
        elif version == 1:
            conn.executescript(
                "BEGIN IMMEDIATE;"
                "ALTER TABLE updates ADD COLUMN blob_offset INTEGER;"
                "ALTER TABLE updates ADD COLUMN blob_length INTEGER;"
                f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
        elif version < SCHEMA_VERSION:
            raise StateError(f"the ledger {path} has unknown schema version {version}")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StateError(f"the ledger {path} is corrupt: {check}")
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise DiskFull(f"the ledger {path}: no space left on the device") from e
        raise StateError(
            f"the ledger {path} is corrupt or not an SQLite database ({e}); "
            "move it aside or restore a backup"
        ) from e
    return str(mode), created
