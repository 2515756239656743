"""The SQLite ledger: round trips, duplicate drops, durability across close and SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aggregator.errors import StateError
from aggregator.store.ledger import (
    SCHEMA_VERSION,
    AgentRow,
    Ledger,
    RejectionRow,
    RoundRow,
    UpdateRow,
)

REPO = Path(__file__).resolve().parents[3]


def _update(task: str, *, round: int = 0, agent: str = "a1", n: int = 32) -> UpdateRow:
    return UpdateRow(
        run_id="run1",
        round=round,
        task_id=task,
        agent_id=agent,
        sha256="ab" * 32,
        num_examples=n,
        metrics={"loss": 1.25, "steps": 4},
        bytes_up=1000 + n,
        bytes_down=2048,
        received_at=100.5,
        blob_path=f"blobs/{task}.safetensors",
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "state" / "ledger.sqlite")
    led.create_run("run1", "fedit", {"rounds": 3, "lr": 0.001})
    led.begin_round("run1", 0, "fedit", ["a1", "a2"], now=100.0)
    yield led
    led.close()


def test_wal_mode_and_schema_version(ledger: Ledger) -> None:
    conn = sqlite3.connect(ledger.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert ledger._c().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_runs(ledger: Ledger) -> None:
    run = ledger.run("run1")
    assert run is not None
    assert (run["method"], run["config"]) == ("fedit", {"rounds": 3, "lr": 0.001})
    ledger.create_run("run1", "fedit", {"rounds": 3, "lr": 0.001})  # idempotent
    with pytest.raises(StateError, match="exists with method 'fedit'"):
        ledger.create_run("run1", "slora", {})
    assert ledger.run("nope") is None
    ledger.create_run("run2", "ferret", {})
    assert ledger.latest_run() == "run2"
    ledger.create_run("run1", "fedit", {})
    assert ledger.latest_run() == "run2"


def test_agents(ledger: Ledger) -> None:
    ledger.upsert_agent("a2", {"gpu": "none", "ram_gb": 8}, now=10.0)
    ledger.upsert_agent("a1", {"gpu": "T4"}, now=11.0)
    ledger.touch_agent("a2", 15.0)
    ledger.touch_agent("a2", 12.0)  # never goes backwards
    ledger.upsert_agent("a1", {"gpu": "A10"}, now=20.0)
    assert ledger.agents() == [
        AgentRow("a1", {"gpu": "A10"}, 11.0, 20.0),
        AgentRow("a2", {"gpu": "none", "ram_gb": 8}, 10.0, 15.0),
    ]
    with pytest.raises(StateError, match="not in the ledger"):
        ledger.touch_agent("ghost", 1.0)


def test_updates_round_trip_and_duplicates_dropped(ledger: Ledger) -> None:
    first = _update("t1", n=32)
    assert ledger.record_update(first) is True
    assert ledger.record_update(_update("t2", agent="a2", n=16)) is True
    assert ledger.has_update("t1") and not ledger.has_update("t3")
    # a retry of t1 (even with different content) is dropped and changes nothing
    assert ledger.record_update(_update("t1", agent="a2", n=999)) is False
    rows = ledger.updates("run1", 0)
    assert [r.task_id for r in rows] == ["t1", "t2"]
    assert rows[0] == first
    assert rows[1].num_examples == 16 and rows[1].bytes_up == 1016
    assert ledger.updates("run1", 1) == []
    n = ledger._c().execute("SELECT count(*) FROM updates WHERE task_id='t1'").fetchone()[0]
    assert n == 1


def test_update_needs_an_open_round(ledger: Ledger) -> None:
    with pytest.raises(StateError, match="never begun"):
        ledger.record_update(_update("t9", round=5))
    ledger.commit_round("run1", 0, "cd" * 32, {}, now=1.0)
    with pytest.raises(StateError, match="already committed"):
        ledger.record_update(_update("late"))
    assert not ledger.has_update("late")


def test_rejections(ledger: Ledger) -> None:
    r1 = RejectionRow("run1", 0, "t5", "a2", "non_finite", "NaN in lora_A", 101.0)
    r2 = RejectionRow("run1", 3, "", "a9", "unknown_round", "no such round", 102.0)
    ledger.record_rejection(r1)
    ledger.record_rejection(r2)
    assert ledger.rejections("run1") == [r1, r2]
    assert ledger.rejections("run1", 3) == [r2]
    assert ledger.rejections("other") == []


def test_rounds_commit_and_metrics(ledger: Ledger) -> None:
    ledger.begin_round("run1", 0, "fedit", ["a2", "a3"], now=150.0)  # restart: merged
    ledger.begin_round("run1", 1, "fedit", ["a1"], now=200.0)
    assert ledger.last_committed_round("run1") is None
    ledger.commit_round("run1", 0, "11" * 32, {"train_loss": 2.5}, now=180.0)
    ledger.commit_round("run1", 0, "11" * 32, {"train_loss": 2.5}, now=181.0)  # idempotent
    with pytest.raises(StateError, match="already committed with checkpoint"):
        ledger.commit_round("run1", 0, "22" * 32, {}, now=182.0)
    ledger.set_round_metrics("run1", 0, {"eval_exact": 0.375})
    ledger.set_round_metrics("run1", 0, {"eval_exact": 0.5, "eval_n": 48})
    assert ledger.last_committed_round("run1") == 0
    assert ledger.rounds("run1") == [
        RoundRow(
            "run1", 0, "fedit", 100.0, 180.0, "11" * 32,
            {"train_loss": 2.5, "eval_exact": 0.5, "eval_n": 48}, ["a1", "a2", "a3"],
        ),
        RoundRow("run1", 1, "fedit", 200.0, None, None, {}, ["a1"]),
    ]  # fmt: skip
    with pytest.raises(StateError, match="already committed"):
        ledger.begin_round("run1", 0, "fedit", [], now=300.0)
    with pytest.raises(StateError, match="began with method"):
        ledger.begin_round("run1", 1, "slora", [], now=300.0)
    with pytest.raises(StateError, match="not in the ledger"):
        ledger.begin_round("nope", 0, "fedit", [], now=300.0)


def test_state_and_nan_refused(ledger: Ledger) -> None:
    assert ledger.get_state("run1", "stage", "missing") == "missing"
    ledger.put_state("run1", "stage", {"name": "sparse", "since_round": 0})
    ledger.put_state("run1", "stage", {"name": "lora", "since_round": 4})
    assert ledger.get_state("run1", "stage") == {"name": "lora", "since_round": 4}
    assert ledger.get_state("run2", "stage") is None
    with pytest.raises(StateError, match="cannot store"):
        ledger.put_state("run1", "bad", float("nan"))
    with pytest.raises(StateError, match="cannot store"):
        ledger.record_update(replace(_update("t1"), metrics={"loss": float("inf")}))
    assert not ledger.has_update("t1")


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led.create_run("run1", "fedit", {})
        led.begin_round("run1", 0, "fedit", ["a1"], now=1.0)
        led.record_update(_update("t1"))
        led.put_state("run1", "k", [1, 2])
    with pytest.raises(StateError, match="closed"):
        led.has_update("t1")
    with Ledger(path) as led:
        assert led.updates("run1", 0) == [_update("t1")]
        assert led.get_state("run1", "k") == [1, 2]
        assert led.latest_run() == "run1"


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    def work(k: int) -> None:
        for i in range(25):
            ledger.record_update(_update(f"t{k}-{i}"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger.updates("run1", 0)) == 100


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 300)
    with pytest.raises(StateError, match="corrupt or not an SQLite database"):
        Ledger(junk)

    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="not an edgefed ledger"):
        Ledger(other)

    damaged = tmp_path / "damaged.sqlite"
    with Ledger(damaged) as led:
        led.create_run("r", "fedit", {})
        for i in range(50):
            led.put_state("r", f"k{i}", "x" * 500)
    data = bytearray(damaged.read_bytes())  # closed cleanly: everything is in the main file
    data[2 * 4096 : 2 * 4096 + 300] = b"\xab" * 300  # scribble over page 3
    damaged.write_bytes(bytes(data))
    with pytest.raises(StateError, match="is corrupt"):
        Ledger(damaged)

    newer = tmp_path / "newer.sqlite"
    Ledger(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer than this edgefed supports"):
        Ledger(newer)


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from aggregator.store.ledger import Ledger, UpdateRow
    led = Ledger(Path(sys.argv[1]))
    led.create_run("run1", "fedit", {})
    led.begin_round("run1", 0, "fedit", ["a1"], now=1.0)
    ok = led.record_update(UpdateRow("run1", 0, "t-crash", "a1", "ef" * 32, 7, {"loss": 0.5},
                                     10, 20, 3.0, None))
    assert ok
    os.kill(os.getpid(), signal.SIGKILL)  # right after the call returned: the Ack would go now
    """
)


def test_row_survives_sigkill_right_after_record_update(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "ledger.sqlite-wal").exists()  # nothing checkpointed it: WAL replay
    with Ledger(path) as led:
        assert led.has_update("t-crash")
        (row,) = led.updates("run1", 0)
        assert (row.num_examples, row.metrics, row.bytes_down) == (7, {"loss": 0.5}, 20)


def test_a_group_of_updates_is_one_transaction(ledger: Ledger) -> None:
    rows = [replace(_update(f"g{i}"), blob_offset=100 * i, blob_length=100) for i in range(3)]
    assert ledger.record_updates([*rows, rows[0]]) == [True, True, True, False]
    got = ledger.updates("run1", 0)
    assert [(r.task_id, r.blob_offset, r.blob_length) for r in got] == [
        ("g0", 0, 100), ("g1", 100, 100), ("g2", 200, 100)
    ]  # fmt: skip
    bad = replace(_update("g9"), metrics={"loss": float("nan")})
    with pytest.raises(StateError):  # one bad row: none of the group is recorded
        ledger.record_updates([_update("g8"), bad])
    assert not ledger.has_update("g8")


def test_a_version_1_ledger_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    Ledger(path).close()
    conn = sqlite3.connect(path)  # what version 1 was: updates without blob_offset/length
    conn.executescript(
        "ALTER TABLE updates DROP COLUMN blob_offset; ALTER TABLE updates DROP COLUMN blob_length;"
        "PRAGMA user_version=1;"
    )
    conn.execute("INSERT INTO runs VALUES ('run1', 'fedit', '{}', 1.0)")
    conn.execute("INSERT INTO rounds VALUES ('run1', 0, 'fedit', 1.0, NULL, NULL, '{}', '[]')")
    conn.execute(
        "INSERT INTO updates VALUES ('run1', 0, 't1', 'a1', 'ab', 3, '{}', 1, 2, 1.0, 'b/t1')"
    )
    conn.commit()
    conn.close()
    with Ledger(path) as led:
        (row,) = led.updates("run1", 0)
        assert (row.blob_path, row.blob_offset, row.blob_length) == ("b/t1", None, None)
        assert led._c().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
