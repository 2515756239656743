"""An allowed agent that lies in its metrics: a value no honest agent reports (non-finite is
refused by the message schema; 1e308, a fraction above 1, a negative loss, more examples
evaluated than its task allows) gets its result rejected, and neither its metrics nor its
update count. Before, a train_loss of 1e308 made the round's mean infinite, the ledger refused
it, and the service stopped at every restart (the checkpoint carried the metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_harness import Harness, lora_state, next_tasks

from aggregator.engine.commits import ROUND_METRICS
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol.messages import Ack, ErrorReply, TaskAssign, TaskResult


def _eval(h: Harness, t: TaskAssign, agent: str, n: int, **metrics: float) -> type:
    res = TaskResult(run_id=t.run_id, round=t.round, task_id=t.task_id, agent_id=agent,
                     method="fedit", kind="eval", num_examples=n, metrics=metrics)  # fmt: skip
    out = h.send(agent, res)
    return type(next(o.header for o in out if isinstance(o.header, Ack | ErrorReply)))


@pytest.mark.parametrize(
    "metrics",
    [{"train_loss": 1e308}, {"train_loss": -1.0}, {"truncated_examples": 99.0}],
)
def test_a_lying_train_result_is_rejected_and_the_round_commits(
    tmp_path: Path, metrics: dict[str, float]
) -> None:
    h = Harness(tmp_path, rounds=1)
    for a in ("honest", "liar"):
        h.hello(a)
    tasks = next_tasks(h, "train")
    h.result(tasks["honest"], "honest", 10, lora_state(1.0))
    t = tasks["liar"]
    from protocol import payloads

    blob = payloads.encode_lora(lora_state(5.0), method="fedit", round=t.round)
    res = TaskResult(run_id=t.run_id, round=t.round, task_id=t.task_id, agent_id="liar",
                     method="fedit", num_examples=10, metrics=metrics)  # fmt: skip
    out = h.send("liar", res, {"update": blob})
    assert [type(o.header) for o in out] == [ErrorReply]
    h.tick()
    assert h.engine.finished
    rows = h.ledger.rounds("run-t")
    assert rows[0].committed_at is not None
    assert rows[0].metrics["train_loss"] == 1.0 and rows[0].metrics["rejected"] == 1.0
    assert [u.agent_id for u in h.ledger.updates("run-t", 1)] == ["honest"]
    h.close()


def test_an_evaluation_beyond_its_task_or_out_of_range_does_not_count(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1, eval=True, eval_initial=True)
    for a in ("a", "b", "c", "d"):
        h.hello(a)
    tasks = next_tasks(h, "eval")
    assert _eval(h, tasks["a"], "a", 64, eval_loss=2.0, eval_rouge_l=0.1) is Ack
    # 64 examples is the task's max_examples (the default EvalParams)
    assert _eval(h, tasks["b"], "b", 10**9, eval_loss=0.0, eval_rouge_l=1.0) is ErrorReply
    assert _eval(h, tasks["c"], "c", 2, eval_loss=1e308) is ErrorReply
    assert _eval(h, tasks["d"], "d", 2, eval_loss=1.0, eval_rouge_l=1.5) is ErrorReply
    next_tasks(h, "train")
    baseline = h.ledger.get_state("run-t", "baseline")
    assert (baseline["eval_loss"], baseline["eval_rouge_l"]) == (2.0, 0.1)
    (evaluation,) = h.ledger.evals("run-t")
    assert sorted(evaluation["agents"]) == ["a"]
    assert sorted(h.ledger.get_state("run-t", "agent_evals")) == ["a"]
    h.close()


def test_a_checkpoint_whose_metrics_the_ledger_refuses_still_restores(tmp_path: Path) -> None:
    """State an older version left behind: round 1's checkpoint written with an infinite mean
    in its metrics, the ledger commit never made. The restart finishes the commit without it."""
    h = Harness(tmp_path, rounds=2)
    for a in ("a", "b"):
        h.hello(a)
    tasks = next_tasks(h, "train")
    for a in ("a", "b"):
        h.result(tasks[a], a, 10, lora_state(1.0))
    h.tick()
    assert h.engine.round == 1
    h.close()
    store = CheckpointStore(tmp_path / "checkpoints")
    tensors, manifest, _ = store.load(1)
    meta = dict(manifest.meta)
    meta[ROUND_METRICS] = json.dumps({"train_loss": float("inf"), "agents": 2.0})
    store.save(1, tensors, method=manifest.method, meta=meta)
    import sqlite3

    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # the commit never made
        db.execute("UPDATE rounds SET committed_at=NULL, checkpoint_sha256=NULL")
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.last_committed_round("run-t") is None
    h = Harness(tmp_path, rounds=2)
    assert h.engine.round == 1
    (row,) = [r for r in h.ledger.rounds("run-t") if r.round == 1]
    assert row.committed_at is not None and row.metrics == {"agents": 2.0}
    h.close()


def test_a_regional_tiers_evaluation_counts_its_agents_total(tmp_path: Path) -> None:
    """A listed region answers an evaluation with its agents' total examples, beyond the
    task's max_examples (64): accepted, weighted by that total (capped at max_weight)."""
    from engine_harness import PROFILE, SHA

    from protocol.messages import Hello

    h = Harness(tmp_path, rounds=1, eval=True, eval_initial=True, regions=("east",))
    h.send("east", Hello(agent_id="east", versions=[1], profile=PROFILE, models=[SHA],
                         role="region"))  # fmt: skip
    h.hello("a")
    tasks = next_tasks(h, "eval")
    assert _eval(h, tasks["east"], "east", 640, eval_loss=1.0, eval_rouge_l=0.5) is Ack
    assert _eval(h, tasks["a"], "a", 64, eval_loss=3.0, eval_rouge_l=0.1) is Ack
    next_tasks(h, "train")
    baseline = h.ledger.get_state("run-t", "baseline")
    assert baseline["eval_loss"] == pytest.approx((640 * 1.0 + 64 * 3.0) / 704)
    h.close()
