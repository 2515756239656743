"""The aggregator crashes at every step of a 3-round run and restarts from disk.

Simulated agents keep unacknowledged results in an outbox and resend them after the restart,
as real agents do. Whatever the crash point, no acknowledged update is lost or counted twice
and the final global state is bit-identical to the uninterrupted run's. (Real SIGKILLs of the
process, and inside a checkpoint write, are in tests/integration and test_checkpoint.py.)
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import pytest
import torch
from engine_harness import Harness, lora_state

from protocol.messages import Ack, TaskAssign

AGENTS = ("a1", "a2", "a3")
ROUNDS = 3


def update_of(round: int, agent: str) -> dict[str, torch.Tensor]:
    return lora_state(round + AGENTS.index(agent) / 7)


def run(
    tmp: Path, crash_at: set[int], *, drop_acks: float = 0.0
) -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """Drive a run; crash at the given steps; drop each Ack with probability ``drop_acks``
    (agents then resend their whole outbox every 5 steps, as after a reconnect)."""
    rng = random.Random(7)
    h = Harness(tmp, rounds=ROUNDS, min_agents=len(AGENTS))
    outbox: dict[str, dict[str, TaskAssign]] = {a: {} for a in AGENTS}
    queue: deque[tuple[str, TaskAssign]] = deque()

    def process(outs: list) -> None:
        for o in outs:
            if isinstance(o.header, TaskAssign):
                outbox[o.agent_id][o.header.task_id] = o.header
                queue.append((o.agent_id, o.header))
            elif isinstance(o.header, Ack) and rng.random() >= drop_acks:
                outbox[o.agent_id].pop(o.header.task_id, None)

    for agent in AGENTS:
        process(h.hello(agent))
    step = 0
    while h.engine.round < ROUNDS:
        step += 1
        assert step < 500, "the run does not make progress"
        if step in crash_at:
            h.close()  # the process dies here; only what is on disk survives
            h = Harness(tmp, rounds=ROUNDS, min_agents=len(AGENTS))
            queue.clear()
            for agent in AGENTS:
                process(h.hello(agent))
                queue.extend((agent, t) for t in outbox[agent].values())  # outbox resend
            continue
        if drop_acks and step % 5 == 0:
            queue.extend((a, t) for a in AGENTS for t in outbox[a].values())
        if queue:
            agent, task = queue.popleft()
            process(h.result(task, agent, 10 + AGENTS.index(agent), update_of(task.round, agent)))
        else:
            process(h.tick())
    state = h.store.load(ROUNDS)[0]
    counts = [len(h.ledger.updates("run-t", r)) for r in range(1, ROUNDS + 1)]
    h.close()
    return state, step, counts


def test_every_crash_point_ends_in_the_same_state(tmp_path: Path) -> None:
    reference, steps, counts = run(tmp_path / "clean", set())
    assert counts == [3, 3, 3]
    assert steps > 10
    for crash_at in range(1, steps + 1):
        state, _, counts = run(tmp_path / f"crash-{crash_at}", {crash_at})
        assert counts == [3, 3, 3], f"crash at step {crash_at}: updates per round {counts}"
        for name, value in reference.items():
            assert torch.equal(state[name], value), f"crash at step {crash_at} changed {name}"


@pytest.mark.parametrize("first", [2, 5, 9])
def test_a_second_crash_right_after_restart(tmp_path: Path, first: int) -> None:
    reference, _, _ = run(tmp_path / "clean", set())
    state, _, counts = run(tmp_path / "twice", {first, first + 1})
    assert counts == [3, 3, 3]
    assert all(torch.equal(state[n], v) for n, v in reference.items())


def test_dropped_acks_and_repeated_results_count_once(tmp_path: Path) -> None:
    reference, _, _ = run(tmp_path / "clean", set())
    state, _, counts = run(tmp_path / "lossy", set(), drop_acks=0.5)
    assert counts == [3, 3, 3]
    assert all(torch.equal(state[n], v) for n, v in reference.items())


def test_crash_inside_a_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Die after round 2's tensor file is written but before its manifest: the restart loads
    round 1 (never the half-written round 2), replays round 2's updates and ends identical."""
    import aggregator.store.checkpoint as checkpoint

    reference, _, _ = run(tmp_path / "clean", set())
    real_write = checkpoint.atomic_write_bytes
    calls = {"manifests": 0}

    def dying_write(path: Path, data: bytes | memoryview) -> None:
        if path.name == "manifest.json":
            calls["manifests"] += 1
            if calls["manifests"] == 2:  # round 2's manifest: the process dies right here
                monkeypatch.setattr(checkpoint, "atomic_write_bytes", real_write)
                raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "torn", set())
    assert (tmp_path / "torn" / "checkpoints" / "round-000002" / "global.safetensors").exists()
    from aggregator.store.checkpoint import CheckpointStore

    assert CheckpointStore(tmp_path / "torn" / "checkpoints").latest() == 1
    state, _, counts = run(tmp_path / "torn", set())  # the restart, agents owing nothing
    assert counts == [3, 3, 3]
    assert all(torch.equal(state[n], v) for n, v in reference.items())


def test_a_damaged_checkpoint_the_ledger_never_committed_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Die after round 2's checkpoint is written, before the ledger commits it, and let that
    checkpoint rot: the restart passes over it (it was never committed), restores round 1,
    replays round 2's stored updates and ends identical."""
    import aggregator.engine.commits as commits

    reference, _, _ = run(tmp_path / "clean", set())
    real = commits.crashpoints.reached

    def dying(point: str, round: int) -> None:
        if point == "commit" and round == 2:
            monkeypatch.setattr(commits.crashpoints, "reached", real)
            raise KeyboardInterrupt
        real(point, round)

    monkeypatch.setattr(commits.crashpoints, "reached", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "rot", set())
    path = tmp_path / "rot" / "checkpoints" / "round-000002" / "global.safetensors"
    path.write_bytes(path.read_bytes()[:-5] + b"rot!!")
    state, _, counts = run(tmp_path / "rot", set())
    assert counts == [3, 3, 3]
    assert all(torch.equal(state[n], v) for n, v in reference.items())


def test_an_unreadable_stored_update_stops_the_restart_with_its_path(tmp_path: Path) -> None:
    """A stored (acknowledged) update of the open round whose log is gone: the restart says
    which task and file, as a DamagedState, not a raw OSError."""
    from aggregator.errors import DamagedState

    h = Harness(tmp_path, rounds=ROUNDS, min_agents=len(AGENTS))
    tasks = {}
    for agent in AGENTS:
        h.hello(agent)
    for o in h.tick():
        if isinstance(o.header, TaskAssign):
            tasks[o.agent_id] = o.header
    acks = h.result(tasks["a1"], "a1", 10, update_of(1, "a1"))
    assert any(isinstance(o.header, Ack) for o in acks)
    h.close()
    log_path = tmp_path / "updates" / "run-t" / "round-000001" / "update-records.log"
    log_path.rename(tmp_path / "elsewhere.log")
    with pytest.raises(DamagedState, match=rf"task {tasks['a1'].task_id}.*update-records.log"):
        Harness(tmp_path, rounds=ROUNDS, min_agents=len(AGENTS))
