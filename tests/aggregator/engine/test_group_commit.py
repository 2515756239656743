"""Durable group commit: the updates handled in one group are synced once, recorded in one
ledger transaction, and acknowledged only then; a crash inside a group loses nothing that was
acknowledged, and the unacknowledged updates are taken again when the agents resend them. The log's sync is a group's
one durable point: its records hold the ledger rows too, and a restart rebuilds rows the ledger
lost from them."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from engine_harness import NAMES, Harness, assigns, lora_state

from aggregator.engine.intake import stored_payload
from aggregator.store.updatelog import scan
from protocol.messages import Ack

AGENTS = ("a", "b", "c")


def start(tmp_path: Path) -> tuple[Harness, dict]:
    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    for agent in AGENTS:
        h.hello(agent)
    return h, assigns(h.tick())


def acked(outs: list) -> list[str]:
    return sorted(o.agent_id for o in outs if isinstance(o.header, Ack) and o.header.accepted)


def test_a_group_is_synced_once_recorded_at_once_and_only_then_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, tasks = start(tmp_path)
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    transactions: list[tuple[int, bool]] = []
    record = h.ledger.record_updates

    def recorded(rows: list, *, sync: bool = True) -> list[bool]:
        transactions.append((len(rows), sync))
        return record(rows, sync=sync)

    monkeypatch.setattr(h.ledger, "record_updates", recorded)
    with h.engine.group() as acks:
        for i, agent in enumerate(AGENTS):
            assert h.result(tasks[agent], agent, 5 + i, lora_state(float(i))) == []
        # a retry inside the group is not answered twice, nor counted twice
        assert h.result(tasks["a"], "a", 5, lora_state(0.0)) == []
        assert h.ledger.updates("run-t", 1) == [] and not syncs  # nothing durable, no Ack
    assert acked(acks) == sorted(AGENTS)
    # one sync: the log's (it holds the rows too); the ledger transaction does not sync
    assert len(syncs) == 1 and transactions == [(len(AGENTS), False)]
    assert h.ledger._c().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    rows = h.ledger.updates("run-t", 1)
    assert [r.agent_id for r in rows] == list(AGENTS)
    assert len({r.blob_path for r in rows}) == 1  # one log for the round
    for i, row in enumerate(rows):  # each row names exactly its payload
        assert row.blob_offset is not None
        assert stored_payload(row) == payload_of(tasks[row.agent_id].round, float(i))
    # a retry once durable is acknowledged at once (outside a group too)
    assert acked(h.result(tasks["b"], "b", 6, lora_state(1.0))) == ["b"]
    h.tick()
    weights = {0.0: 5, 1.0: 6, 2.0: 7}
    expected = sum(w * lora_state(v)[NAMES[1]].double() for v, w in weights.items()) / 18
    torch.testing.assert_close(h.method.global_state[NAMES[1]], expected.float())
    h.close()


def payload_of(round: int, value: float) -> bytes:
    from protocol import payloads

    return payloads.encode_lora(lora_state(value), method="fedit", round=round)


def test_outside_a_group_each_update_is_durable_before_its_ack(tmp_path: Path) -> None:
    h, tasks = start(tmp_path)
    outs = h.result(tasks["a"], "a", 5, lora_state(1.0))
    assert acked(outs) == ["a"] and [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a"]
    h.close()


def expected_mean(weights: dict[float, int]) -> torch.Tensor:
    total = sum(weights.values())
    return (sum(w * lora_state(v)[NAMES[1]].double() for v, w in weights.items()) / total).float()


def log_path(h: Harness) -> Path:
    (log_,) = h.engine.intake._logs.values()
    return log_.path


def test_a_crash_after_a_groups_log_sync_rebuilds_its_rows_and_counts_each_update_once(
    tmp_path: Path,
) -> None:
    """The crash point ``group``: the log is synced, the ledger transaction never ran, no Ack."""
    h, tasks = start(tmp_path)
    with h.engine.group() as acks:  # group 1: "a", durable and acknowledged
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    assert acked(acks) == ["a"]
    h.engine._grouping += 1  # inside a group, as the service is while it drains a burst
    h.result(tasks["b"], "b", 6, lora_state(1.0))
    h.result(tasks["c"], "c", 7, lora_state(2.0))
    h.engine.intake._logs[("run-t", 1)].sync()
    h.close()  # only what is on disk survives

    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    # the log held "b" and "c" whole: rebuilt into the ledger and replayed with "a"
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a", "b", "c"]
    assert set(h.engine._replayed) == set(AGENTS)
    for agent in AGENTS:
        h.hello(agent)
    assert assigns(h.tick()) == {}  # every task of the round is done
    # "b" and "c" never got their Ack: they resend, are acknowledged, and count once
    assert acked(h.result(tasks["b"], "b", 6, lora_state(1.0))) == ["b"]
    assert acked(h.result(tasks["c"], "c", 7, lora_state(2.0))) == ["c"]
    h.tick()
    assert h.summaries and h.summaries[-1].agents == 3
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


def test_a_power_cut_that_loses_a_groups_ledger_transaction_loses_no_acknowledged_update(
    tmp_path: Path,
) -> None:
    """The transaction of a group commits without a sync: a power cut may lose it whole. Its
    rows come back from the log (simulated: the rows deleted before the restart)."""
    h, tasks = start(tmp_path)
    with h.engine.group() as acks:
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    with h.engine.group() as acks:
        h.result(tasks["b"], "b", 6, lora_state(1.0))
        h.result(tasks["c"], "c", 7, lora_state(2.0))
    assert acked(acks) == ["b", "c"]
    h.close()
    ledger = sqlite3.connect(tmp_path / "ledger.sqlite")
    with ledger:
        ledger.execute("DELETE FROM updates WHERE agent_id != 'a'")
    ledger.close()

    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    rows = h.ledger.updates("run-t", 1)
    assert [r.agent_id for r in rows] == ["a", "b", "c"]
    for row in rows:
        assert stored_payload(row) == payload_of(1, {"a": 0.0, "b": 1.0, "c": 2.0}[row.agent_id])
    for agent in AGENTS:
        h.hello(agent)
    h.tick()
    h.tick()
    assert h.summaries and h.summaries[-1].agents == 3
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_a_crash_before_a_groups_log_sync_loses_only_unacknowledged_updates(
    tmp_path: Path, damage: str
) -> None:
    """A crash mid-write leaves a record cut short; a power cut may leave a whole record
    whose payload bytes were never written. The log is cut there; only unacknowledged
    updates are lost, and their agents resend them."""
    h, tasks = start(tmp_path)
    with h.engine.group() as acks:  # group 1: "a", durable and acknowledged
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    assert acked(acks) == ["a"]
    path = log_path(h)
    written = path.stat().st_size
    h.engine._grouping += 1  # group 2: "b" and "c" written, the sync never returned
    h.result(tasks["b"], "b", 6, lora_state(1.0))
    h.result(tasks["c"], "c", 7, lora_state(2.0))
    h.engine.intake._logs[("run-t", 1)].sync()  # (the bytes reach the file)
    h.close()
    (a_rec, b_rec, c_rec) = scan(path)[0]
    with open(path, "r+b") as f:
        if damage == "cut":  # "c" cut short: "b" is whole and is rebuilt
            f.truncate(c_rec.end - 1)
            lost = ["c"]
        else:  # "b"'s payload never written (zeros): the log is cut there, "c" goes too
            f.seek(b_rec.offset + 100)
            f.write(bytes(50))
            lost = ["b", "c"]

    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    kept = [a for a in AGENTS if a not in lost]
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == kept
    cut_at = c_rec.start if damage == "cut" else b_rec.start
    assert path.stat().st_size == cut_at and cut_at >= written
    for agent in AGENTS:
        h.hello(agent)
    tasks = assigns(h.tick())
    assert sorted(tasks) == lost  # the open round's unfinished tasks, re-sent
    with h.engine.group() as acks:  # the agents resend their outboxes
        for agent in lost:
            examples, value = {"b": (6, 1.0), "c": (7, 2.0)}[agent]
            h.result(tasks[agent], agent, examples, lora_state(value))
    assert acked(acks) == lost
    rows = h.ledger.updates("run-t", 1)
    assert [r.agent_id for r in rows] == kept + lost
    assert all(r.blob_offset is not None and r.blob_offset > cut_at for r in rows[len(kept) :])
    assert [rec.row["agent_id"] for rec in scan(path)[0]] == kept + lost
    h.tick()
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


def test_a_log_whose_round_the_ledger_never_began_is_left_alone(tmp_path: Path) -> None:
    """A ledger older than the logs (restored from a backup): the service still starts."""
    h, tasks = start(tmp_path)
    with h.engine.group():
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    path = log_path(h)
    size = path.stat().st_size
    h.close()
    ledger = sqlite3.connect(tmp_path / "ledger.sqlite")
    with ledger:
        ledger.execute("DELETE FROM updates")
        ledger.execute("DELETE FROM rounds")
    ledger.close()
    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    assert h.ledger.updates("run-t", 1) == [] and path.stat().st_size == size
    h.close()


def test_overlapping_groups_sync_while_the_next_is_taken_and_ack_only_once_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``group(overlap=True)``: a group's log sync runs on the appender thread while the next
    group is taken; its Acks come with the next group's end (or a flush), and only once its
    records are synced and its rows recorded."""
    h, tasks = start(tmp_path)
    synced_on: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (synced_on.append(threading.current_thread().name), real(fd))[1]
    )
    with h.engine.group(overlap=True) as first:
        h.result(tasks["a"], "a", 5, lora_state(0.0))
        h.result(tasks["b"], "b", 6, lora_state(1.0))
    assert first == [] and h.engine.syncing  # sealed: its sync under way, no Ack yet
    assert h.result(tasks["a"], "a", 5, lora_state(0.0)) == []  # a retry: answered with it
    with h.engine.group(overlap=True) as second:
        h.result(tasks["c"], "c", 7, lora_state(2.0))
        assert h.ledger.updates("run-t", 1) == []  # the first group is not recorded yet
        sealed = h.engine.intake.sealed
        assert sealed is not None
        for sync in sealed[1]:  # synced by now (else this group would stay open: see below)
            sync.result()
    assert acked(second) == ["a", "b"]  # the first group's Acks, now durable and recorded
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a", "b"]
    assert h.engine.syncing
    assert acked(h.engine.flush()) == ["c"] and not h.engine.syncing
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a", "b", "c"]
    assert synced_on and all(name.startswith("update-log") for name in synced_on)
    h.tick()
    assert h.summaries and h.summaries[-1].agents == 3
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


def test_a_group_that_ends_while_the_one_before_still_syncs_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is not held up by a slow disk: the group's end does not wait for the sync of
    the group before; its updates join the next group, and nothing is acknowledged before its
    own sync."""
    h, tasks = start(tmp_path)
    gate = threading.Event()
    real = os.fdatasync

    def slow(fd: int) -> None:
        gate.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    with h.engine.group(overlap=True) as first:
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    assert first == [] and h.engine.syncing
    with h.engine.group(overlap=True) as second:
        h.result(tasks["b"], "b", 6, lora_state(1.0))
    # returned at once: "a" still syncs, "b" waits in the open group
    assert second == [] and h.engine.intake.is_pending(tasks["b"].task_id)
    assert h.ledger.updates("run-t", 1) == []
    gate.set()
    sealed = h.engine.intake.sealed
    assert sealed is not None
    for sync in sealed[1]:
        sync.result()
    with h.engine.group(overlap=True) as third:
        h.result(tasks["c"], "c", 7, lora_state(2.0))
    assert acked(third) == ["a"]  # "b" and "c" are sealed together now: one sync for both
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a"]
    assert acked(h.engine.flush()) == ["b", "c"]
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a", "b", "c"]
    h.tick()
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


def test_a_crash_while_a_sealed_group_syncs_loses_no_acknowledged_update(tmp_path: Path) -> None:
    """A SIGKILL while a group's sync is under way (or done, its rows not yet recorded): no Ack
    went out for it; what its records hold whole is rebuilt, and the resends count once."""
    h, tasks = start(tmp_path)
    with h.engine.group(overlap=True):
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    assert acked(h.engine.flush()) == ["a"]
    with h.engine.group(overlap=True) as acks:
        h.result(tasks["b"], "b", 6, lora_state(1.0))
        h.result(tasks["c"], "c", 7, lora_state(2.0))
    assert acks == []
    sealed = h.engine.intake.sealed
    assert sealed is not None
    for sync in sealed[1]:
        sync.result()
    h.engine.intake.sealed = None  # killed here: never recorded, never acknowledged
    h.close()

    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a", "b", "c"]
    for agent in AGENTS:
        h.hello(agent)
    assert assigns(h.tick()) == {}
    assert acked(h.result(tasks["b"], "b", 6, lora_state(1.0))) == ["b"]
    assert acked(h.result(tasks["c"], "c", 7, lora_state(2.0))) == ["c"]
    h.tick()
    assert h.summaries and h.summaries[-1].agents == 3
    torch.testing.assert_close(
        h.method.global_state[NAMES[1]], expected_mean({0.0: 5, 1.0: 6, 2.0: 7})
    )
    h.close()


def test_closing_the_engine_records_a_group_still_syncing(tmp_path: Path) -> None:
    h, tasks = start(tmp_path)
    with h.engine.group(overlap=True):
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    h.engine.close()  # the service's shutdown
    h.ledger.close()
    ledger = sqlite3.connect(tmp_path / "ledger.sqlite")  # recorded at the close, not rebuilt
    assert ledger.execute("SELECT agent_id FROM updates").fetchall() == [("a",)]
    ledger.close()
