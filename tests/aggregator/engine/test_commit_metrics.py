"""A kill between the checkpoint write and the ledger commit keeps the round's metrics (issue 24)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_harness import Harness, lora_state, start_round


class Killed(Exception):
    """Stands for the SIGKILL: the process stops right after the checkpoint is durable."""


def test_metrics_survive_a_kill_between_checkpoint_and_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 30, lora_state(3.0))

    def killed(*_args: Any, **_kw: Any) -> None:
        raise Killed

    monkeypatch.setattr(h.ledger, "commit_round", killed)
    with pytest.raises(Killed):
        h.tick()
    assert h.store.latest() == 1  # the checkpoint is on disk, the ledger never heard of it
    h.close()
    monkeypatch.undo()

    h2 = Harness(tmp_path)  # the restart finishes the commit
    try:
        (row,) = h2.ledger.rounds("run-t")
        assert row.committed_at is not None
        assert row.metrics["agents"] == 2.0 and row.metrics["train_loss"] == 1.0
        assert "edgefed.round_metrics" not in h2.method.state()[1]
    finally:
        h2.close()


def test_an_evaluation_cut_by_a_kill_runs_again_after_the_restart(tmp_path: Path) -> None:
    from engine_harness import assigns

    from protocol.messages import TaskResult

    h = Harness(tmp_path, eval=True, eval_initial=False)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 30, lora_state(3.0))
    evals = assigns(h.tick())  # round 1 committed, its evaluation handed out...
    assert {t.kind for t in evals.values()} == {"eval"}
    h.close()  # ...and the aggregator is killed before any result comes back

    h2 = Harness(tmp_path, eval=True, eval_initial=False)
    try:
        again = start_round(h2, ["a1", "a2"])
        assert {(t.kind, t.round) for t in again.values()} == {("eval", 1)}
        for agent, task in again.items():
            res = TaskResult(run_id=task.run_id, round=1, task_id=task.task_id, agent_id=agent,
                             method="fedit", kind="eval", num_examples=4,
                             metrics={"eval_loss": 2.5, "eval_em": 0.25})  # fmt: skip
            h2.send(agent, res)
        h2.tick()  # the evaluation closes
        following = assigns(h2.tick())
        assert {(t.kind, t.round) for t in following.values()} == {("train", 2)}
        (row,) = [r for r in h2.ledger.rounds("run-t") if r.round == 1]
        assert row.metrics["eval_loss"] == 2.5 and row.metrics["agents"] == 2.0
    finally:
        h2.close()
