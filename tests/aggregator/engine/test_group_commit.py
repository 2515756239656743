"""Durable group commit: the updates handled in one group are synced once, recorded in one
ledger transaction, and acknowledged only then; a crash inside a group loses nothing that was
acknowledged, and the unacknowledged updates are taken again when the agents resend them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from engine_harness import NAMES, Harness, assigns, lora_state

from aggregator.engine.intake import stored_payload
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
    transactions: list[int] = []
    record = h.ledger.record_updates
    monkeypatch.setattr(
        h.ledger, "record_updates", lambda rows: (transactions.append(len(rows)), record(rows))[1]
    )
    with h.engine.group() as acks:
        for i, agent in enumerate(AGENTS):
            assert h.result(tasks[agent], agent, 5 + i, lora_state(float(i))) == []
        # a retry inside the group is not answered twice, nor counted twice
        assert h.result(tasks["a"], "a", 5, lora_state(0.0)) == []
        assert h.ledger.updates("run-t", 1) == [] and not syncs  # nothing durable, no Ack
    assert acked(acks) == sorted(AGENTS)
    assert len(syncs) == 1 and transactions == [len(AGENTS)]
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


def test_a_crash_inside_a_group_loses_only_unacknowledged_updates(tmp_path: Path) -> None:
    h, tasks = start(tmp_path)
    with h.engine.group() as acks:  # group 1: "a", durable and acknowledged
        h.result(tasks["a"], "a", 5, lora_state(0.0))
    assert acked(acks) == ["a"]
    # group 2: "b" and "c" are written to the log (and synced), then the process dies before
    # the ledger transaction: the crash point ``group``
    h.engine._grouping += 1  # inside a group, as the service is while it drains a burst
    h.result(tasks["b"], "b", 6, lora_state(1.0))
    h.result(tasks["c"], "c", 7, lora_state(2.0))
    for log_ in h.engine.intake._logs.values():
        log_.sync()
    log_path = Path(h.ledger.updates("run-t", 1)[0].blob_path or "")
    written = log_path.stat().st_size
    h.close()  # only what is on disk survives

    h = Harness(tmp_path, rounds=1, min_agents=len(AGENTS))
    # the restart replays "a" only: "b" and "c" were never acknowledged
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a"]
    assert set(h.engine._replayed) == {"a"}
    for agent in AGENTS:
        h.hello(agent)
    tasks = assigns(h.tick())
    assert sorted(tasks) == ["b", "c"]  # the open round's unfinished tasks, re-sent
    with h.engine.group() as acks:  # the agents resend their outboxes
        h.result(tasks["b"], "b", 6, lora_state(1.0))
        h.result(tasks["c"], "c", 7, lora_state(2.0))
    assert acked(acks) == ["b", "c"]
    rows = h.ledger.updates("run-t", 1)
    assert [r.agent_id for r in rows] == ["a", "b", "c"]
    assert all(r.blob_offset is not None and r.blob_offset >= written for r in rows[1:])
    h.tick()
    weights = {0.0: 5, 1.0: 6, 2.0: 7}
    expected = sum(w * lora_state(v)[NAMES[1]].double() for v, w in weights.items()) / 18
    torch.testing.assert_close(h.method.global_state[NAMES[1]], expected.float())
    h.close()
