"""The round engine and FedAvg, in-process: simulated agents send real payloads, no sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_harness import NAMES, PROFILE, SHA, Harness, assigns, h, lora_state, start_round

from aggregator.errors import UpdateRejected
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Ack, ErrorReply, Hello, TaskResult

__all__ = ["h"]  # the fixture


def test_fedavg_is_weighted_by_examples(h: Harness) -> None:
    tasks = start_round(h, ["a1", "a2"])
    assert set(tasks) == {"a1", "a2"}
    assert tasks["a1"].round == 1 and "global" not in h.method.assign(1, "a1", "train").blobs
    s1, s2 = lora_state(1.0), lora_state(5.0)
    assert isinstance(h.result(tasks["a1"], "a1", 10, s1)[0].header, Ack)
    assert isinstance(h.result(tasks["a2"], "a2", 30, s2)[0].header, Ack)
    h.tick()
    tensors, manifest, _ = h.store.load(1)
    for name in NAMES:
        expected = (10 * s1[name] + 30 * s2[name]) / 40
        torch.testing.assert_close(tensors[name], expected, rtol=0, atol=1e-6)
    assert manifest.round == 1
    assert h.ledger.last_committed_round("run-t") == 1
    assert h.summaries[-1].agents == 2
    # round 2 ships the aggregate to every agent
    round2 = assigns(h.tick())
    assert set(round2) == {"a1", "a2"} and round2["a1"].round == 2
    blob = h.method.assign(2, "a1", "train").blobs["global"]
    sent = payloads.decode(blob).tensors
    torch.testing.assert_close(sent[NAMES[0]], tensors[NAMES[0]], rtol=0, atol=0)


def test_duplicate_result_is_acked_and_counted_once(h: Harness) -> None:
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    again = h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    assert isinstance(again[0].header, Ack)
    assert len(h.ledger.updates("run-t", 1)) == 1
    h.result(tasks["a2"], "a2", 10, lora_state(3.0))
    h.tick()
    tensors, _, _ = h.store.load(1)
    torch.testing.assert_close(tensors[NAMES[0]], lora_state(2.0)[NAMES[0]])


def test_invalid_update_is_rejected_recorded_and_round_goes_on(h: Harness) -> None:
    tasks = start_round(h, ["a1", "a2"])
    bad = lora_state(1.0)
    bad[NAMES[0]][0, 0] = 12345.0
    reply = h.result(tasks["a1"], "a1", 10, bad, nan=True)[0].header
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.REJECTED_UPDATE
    assert "finite" in reply.reason.lower() or "nan" in reply.reason.lower()
    rejections = h.ledger.rejections("run-t", 1)
    assert [r.agent_id for r in rejections] == ["a1"]
    h.result(tasks["a2"], "a2", 10, lora_state(7.0))
    h.tick()
    tensors, _, _ = h.store.load(1)
    torch.testing.assert_close(tensors[NAMES[0]], lora_state(7.0)[NAMES[0]])
    assert h.summaries[-1].rejected == 1


def test_stale_and_foreign_results(h: Harness) -> None:
    tasks = start_round(h, ["a1", "a2"])
    wrong = tasks["a1"].model_copy(update={"task_id": "r1-train-forged"})
    reply = h.result(wrong, "a1", 10, lora_state(1.0))[0].header
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.STALE_TASK
    # a result claiming another agent's identity
    header = TaskResult(
        run_id="run-t",
        round=1,
        task_id=tasks["a2"].task_id,
        agent_id="a2",
        method="fedit",
        num_examples=1,
    )
    reply = h.send("a1", header)[0].header
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.IDENTITY_MISMATCH


def test_hello_version_mismatch_and_identity(h: Harness) -> None:
    out = h.send("a1", Hello(agent_id="a1", versions=[99], profile=PROFILE))
    assert (
        isinstance(out[0].header, ErrorReply) and out[0].header.code == ErrorCode.VERSION_MISMATCH
    )
    out = h.send("a1", Hello(agent_id="someone-else", versions=[1], profile=PROFILE))
    assert out[0].header.code == ErrorCode.IDENTITY_MISMATCH  # type: ignore[union-attr]


def test_deadline_drops_straggler_at_quorum(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=3, quorum=0.6)
    try:
        tasks = start_round(h, ["a1", "a2", "a3"])
        h.result(tasks["a1"], "a1", 10, lora_state(1.0))
        h.tick(30)
        assert h.engine.phase is not None  # before the deadline, it waits
        for a in ("a1", "a2", "a3"):  # keep them alive
            h.send(a, Hello(agent_id=a, versions=[1], profile=PROFILE, models=[SHA]))
        h.result(tasks["a2"], "a2", 10, lora_state(3.0))
        h.tick(31)
        assert h.engine.round == 1
        tensors, _, _ = h.store.load(1)
        torch.testing.assert_close(tensors[NAMES[0]], lora_state(2.0)[NAMES[0]])
        late = h.result(tasks["a3"], "a3", 10, lora_state(100.0))[0].header
        assert isinstance(late, ErrorReply) and late.code == ErrorCode.STALE_TASK
    finally:
        h.close()


def test_restart_mid_round_replays_stored_updates(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.close()  # the aggregator dies here; a1's update was Acked
    h2 = Harness(tmp_path)
    try:
        again = start_round(h2, ["a1", "a2"])
        assert again["a2"].task_id == tasks["a2"].task_id  # same task ids after a restart
        dup = h2.result(tasks["a1"], "a1", 10, lora_state(1.0))[0].header
        assert isinstance(dup, Ack)  # a1 resends from its outbox: acked, not counted twice
        h2.result(tasks["a2"], "a2", 30, lora_state(5.0))
        h2.tick()
        tensors, _, _ = h2.store.load(1)
        expected = (10 * lora_state(1.0)[NAMES[0]] + 30 * lora_state(5.0)[NAMES[0]]) / 40
        torch.testing.assert_close(tensors[NAMES[0]], expected, rtol=0, atol=1e-6)
    finally:
        h2.close()


def test_restart_after_commit_restores_identical_state(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 3, lora_state(0.123))
    h.result(tasks["a2"], "a2", 7, lora_state(-0.456))
    h.tick()
    before = h.method.assign(2, "a1", "train").blobs["global"]
    h.close()
    h2 = Harness(tmp_path)
    try:
        assert h2.engine.round == 1
        after = h2.method.assign(2, "a1", "train").blobs["global"]
        assert after == before  # bit-identical global state after the restart
        nxt = start_round(h2, ["a1", "a2"])
        assert nxt["a1"].round == 2
    finally:
        h2.close()


def test_agent_with_another_model_is_refused_with_both_hashes(h: Harness) -> None:
    other = "ee" * 32
    out = h.send("a1", Hello(agent_id="a1", versions=[1], profile=PROFILE, models=[other]))
    reply = out[0].header
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.MODEL_MISMATCH
    assert SHA in reply.reason and other in reply.reason
    assert not h.engine.registry.known("a1")


def test_an_assignment_is_encoded_once_and_its_bytes_counted(h: Harness) -> None:
    """The engine encodes a task's frames once (a large blob's sha256 is costly); the service
    sends those very frames, and the phase counts their size as the agent's bytes down."""
    from protocol.frames import decode, frames_nbytes
    from protocol.messages import TaskAssign

    tasks = start_round(h, ["a1", "a2"])
    for agent in tasks:
        h.result(tasks[agent], agent, 10, lora_state(1.0))
    h.tick()  # round 1 commits
    out = [o for o in h.tick() if isinstance(o.header, TaskAssign)]  # round 2, with the global
    out.sort(key=lambda o: o.agent_id)
    assert [o.agent_id for o in out] == ["a1", "a2"] and out[0].encoded is not None
    assert out[0].frames() is out[0].encoded
    sent = decode(out[0].frames())
    assert isinstance(sent.header, TaskAssign) and sent.header.round == 2
    assert bytes(sent.blobs["global"]) == bytes(out[0].blobs["global"])
    assert h.engine.phase is not None
    assert h.engine.phase.bytes_down["a1"] == frames_nbytes(out[0].encoded)


def test_only_listed_ids_may_join_as_a_regional_tier(tmp_path: Path) -> None:
    """A region's update stands for many agents: a Hello claiming role "region" is refused
    unless [security] regions lists the id; listed, it joins and is seen as a region."""
    from engine_harness import Harness as H

    h = H(tmp_path, regions=("east",))
    try:
        for agent in ("east", "west"):
            hello = Hello(
                agent_id=agent, versions=[1], profile=PROFILE, models=[SHA], role="region"
            )
            out = h.send(agent, hello)
            if agent == "east":
                assert out[0].header.type == "welcome"
                assert h.engine.admission.view("east").role == "region"
            else:
                assert isinstance(out[0].header, ErrorReply)
                assert out[0].header.code == ErrorCode.UNKNOWN_AGENT
                assert "[security] regions" in out[0].header.reason
                assert "west" not in h.engine.registry.agents
        assert h.hello("west")[0].header.type == "welcome"  # as a plain agent it may join
    finally:
        h.close()


def test_an_update_the_method_cannot_add_is_rejected_and_neither_stored_nor_counted(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intake folds an update in when it takes it, before its record is written: an
    update ``add`` refuses is answered and recorded as a rejection, and never stored."""
    tasks = start_round(h, ["a1", "a2"])
    real = h.method.add

    def add(update: Any) -> None:
        if update.agent_id == "a1":
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "not this one")
        real(update)

    monkeypatch.setattr(h.method, "add", add)
    reply = h.result(tasks["a1"], "a1", 10, lora_state(1.0))[0].header
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.REJECTED_UPDATE
    assert [r.agent_id for r in h.ledger.rejections("run-t", 1)] == ["a1"]
    assert h.ledger.updates("run-t", 1) == [] and not h.engine.intake.pending
    h.result(tasks["a2"], "a2", 10, lora_state(7.0))
    h.tick()
    tensors, _, _ = h.store.load(1)
    torch.testing.assert_close(tensors[NAMES[0]], lora_state(7.0)[NAMES[0]])
    assert [r.agent_id for r in h.ledger.updates("run-t", 1)] == ["a2"]
    assert h.summaries[-1].rejected == 1
