"""Upload grants go only to the task an agent was assigned in the open round (issue 24).

An agent listing 64 made-up task ids in every heartbeat once took every upload slot (honest
updates waited, the deadline kept extending below quorum) and grew the aggregator's queue without
bound. Now made-up, foreign and old ids are never queued: a few are answered STALE_TASK.
"""

from __future__ import annotations

from pathlib import Path

from engine_harness import Harness, assigns, lora_state

from aggregator.engine.rounds import task_id_for
from aggregator.engine.uploads import MAX_STALE_REPLIES
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply, Grant, Heartbeat


def grants(h: Harness) -> list[tuple[str, str]]:
    return [(o.agent_id, o.header.task_id) for o in h.tick() if isinstance(o.header, Grant)]  # type: ignore[attr-defined]


def test_made_up_and_foreign_task_ids_get_no_grant(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1, min_agents=4)
    try:
        for a in ("evil", "a1", "a2", "a3"):
            h.hello(a)
        tasks = assigns(h.tick())
        fake = [f"fake-{i}" for i in range(60)]
        foreign = [tasks["a1"].task_id, task_id_for(h.engine.run_id, 7, "train", "evil")]
        for _ in range(20):  # a flood of heartbeats, each listing 64 ids it was not assigned
            out = h.send("evil", Heartbeat(ready=[*fake, *foreign, tasks["evil"].task_id][-64:]))
            stale = [o.header for o in out if isinstance(o.header, ErrorReply)]
            assert len(stale) <= MAX_STALE_REPLIES
            assert all(e.code == ErrorCode.STALE_TASK for e in stale)
        assert set(h.engine.uploads.ready) <= {tasks["evil"].task_id}  # bounded: its own task
        got = grants(h)
        assert got == [("evil", tasks["evil"].task_id)]  # its own task, once
        for a in ("a1", "a2", "a3"):  # the honest agents are granted at once
            h.send(a, Heartbeat(ready=[tasks[a].task_id]))
        assert sorted(grants(h)) == sorted((a, tasks[a].task_id) for a in ("a1", "a2", "a3"))
        for a in ("a1", "a2", "a3"):
            assert h.result(tasks[a], a, 5, lora_state(1.0))[0].header.type == "ack"
        h.send("evil", Heartbeat(ready=fake))
        assert grants(h) == []
    finally:
        h.close()


def test_a_delivered_task_is_not_granted_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=2, min_agents=2)
    try:
        for a in ("a1", "a2"):
            h.hello(a)
        tasks = assigns(h.tick())
        h.result(tasks["a1"], "a1", 5, lora_state(1.0))
        out = h.send("a1", Heartbeat(ready=[tasks["a1"].task_id]))
        assert [o.header.type for o in out] == ["ack"]  # durable: acked again, not queued
        assert grants(h) == []
    finally:
        h.close()


def test_another_agent_naming_a_task_does_not_cancel_its_place_or_its_grant(
    tmp_path: Path,
) -> None:
    """Task ids derive from public values: an agent that sends a result naming the victim's
    task (refused: not its task) neither takes the victim out of the grant queue nor frees the
    victim's outstanding grant (which would let more uploads than the window run at once)."""
    from protocol.messages import TaskResult

    h = Harness(tmp_path, rounds=1, min_agents=2)
    try:
        for a in ("victim", "evil"):
            h.hello(a)
        assigns(h.tick())
        vt = task_id_for(h.engine.run_id, 1, "train", "victim")
        forged = TaskResult(run_id=h.engine.run_id, round=1, task_id=vt, agent_id="evil",
                            method="fedit", num_examples=1)  # fmt: skip
        h.send("victim", Heartbeat(ready=[vt]))
        out = h.send("evil", forged)
        assert [o.header.code for o in out] == [ErrorCode.STALE_TASK]  # type: ignore[attr-defined]
        assert grants(h) == [("victim", vt)]  # still queued: granted at the next tick
        h.send("evil", forged)
        assert vt in h.engine.uploads.granted  # the grant stays out, its slot taken
    finally:
        h.close()
