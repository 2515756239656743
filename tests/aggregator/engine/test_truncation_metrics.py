"""What ``max_len`` cut on every agent is summed into the round's metrics (``truncated_*`` of
training, ``eval_truncated_*`` of the evaluation: the ledger's row, ``status --json``, the local
table) and into a region's report upstream."""

from __future__ import annotations

from pathlib import Path

from engine_harness import MODEL, Harness, lora_state, next_tasks

from aggregator.engine.rounds import truncation_totals
from aggregator.local.round_table import RoundTable
from aggregator.store.ledger import Ledger
from aggregator.tier.relay import weighted_metrics
from protocol import payloads
from protocol.messages import TaskAssign, TaskResult

CUTS = {  # kind -> agent -> (examples cut, mean tokens cut, longest cut)
    "train": {"a": (3.0, 10.0, 20.0), "b": (0.0, 0.0, 0.0)},
    "eval": {"a": (1.0, 50.0, 50.0), "b": (2.0, 4.0, 6.0)},
}


def _cut(kind: str, agent: str) -> dict[str, float]:
    n, mean, most = CUTS[kind][agent]
    return {"truncated_examples": n, "truncated_tokens_mean": mean, "truncated_tokens_max": most}


def _result(t: TaskAssign, agent: str, metrics: dict[str, float]) -> TaskResult:
    return TaskResult(run_id=t.run_id, round=t.round, task_id=t.task_id, agent_id=agent,
                      method="fedit", kind=t.kind, num_examples=4, metrics=metrics)  # fmt: skip


def test_a_rounds_truncation_is_summed_over_agents_train_and_eval(tmp_path: Path) -> None:
    h = Harness(tmp_path, rounds=1, eval=True, eval_initial=False)
    for a in ("a", "b"):
        h.hello(a)
    tasks = next_tasks(h, "train")
    for a, v in (("a", 1.0), ("b", 2.0)):
        blob = payloads.encode_lora(lora_state(v), method="fedit", round=1)
        result = _result(tasks[a], a, {"train_loss": 1.0, **_cut("train", a)})
        h.send(a, result, {"update": blob})
    for a, t in next_tasks(h, "eval").items():
        h.send(a, _result(t, a, {"eval_loss": 2.0, **_cut("eval", a)}))
    h.tick()
    assert h.engine.finished
    [summary] = [s for s in h.summaries if s.round == 1]
    train = {  # summed over the agents (3 + 0), the mean weighted by the examples cut
        "truncated_examples": 3.0,
        "truncated_tokens_mean": 10.0,
        "truncated_tokens_max": 20.0,
    }
    evaluation = {  # 1 + 2 examples: (1 * 50 + 2 * 4) / 3 tokens on average
        "eval_truncated_examples": 3.0,
        "eval_truncated_tokens_mean": round(58 / 3, 2),
        "eval_truncated_tokens_max": 50.0,
    }
    assert summary.as_metrics().items() >= (train | evaluation).items()
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        [row] = [r for r in ledger.rounds("run-t") if r.round == 1]
    assert {k: row.metrics[k] for k in train | evaluation} == train | evaluation
    h.close()

    class Out:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    out = Out()
    RoundTable(out)(summary)  # type: ignore[arg-type]
    assert "truncated=3 (max 20 tokens)  eval_truncated=3 (max 50 tokens)" in out.text


def test_no_report_no_keys_and_regions_sum_too() -> None:
    assign = TaskAssign(run_id="r", round=1, task_id="t", method="fedit", kind="train",
                        model=MODEL, deadline_s=60.0)  # fmt: skip
    plain = [_result(assign, a, {"train_loss": 1.0}) for a in ("a", "b")]
    assert truncation_totals(plain) == {}
    cut = [_result(assign, a, {"train_loss": 1.0, **_cut("eval", a)}) for a in ("a", "b")]
    total, metrics = weighted_metrics(cut)
    assert total == 8
    assert metrics == {
        "train_loss": 1.0,
        "truncated_examples": 3.0,
        "truncated_tokens_mean": round((50 + 2 * 4) / 3, 2),
        "truncated_tokens_max": 50.0,
    }
