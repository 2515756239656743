"""Every evaluation of the global (round 0 included) lands in the ledger per agent and in
aggregate, and ``status`` and ``report`` show it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from engine_harness import Harness, lora_state, next_tasks

from aggregator.cli import main
from aggregator.ops.report import write_report
from aggregator.store.ledger import Ledger
from protocol.messages import TaskAssign, TaskResult

SCORES = {  # round -> agent -> (examples, loss, rouge-l, em)
    0: {"a": (3, 2.0, 0.2, 0.0), "b": (1, 3.0, 0.6, 1.0)},
    1: {"a": (3, 1.0, 0.5, 1 / 3), "b": (1, 2.0, 0.9, 1.0)},
}


SIDE = {"a": 4.0, "b": 8.0}  # a side metric (FedBiOT's emulator loss) from round 1's evaluation


def _answer_evals(h: Harness, tasks: dict[str, TaskAssign], round: int, side: bool = False) -> None:
    for a, t in tasks.items():
        n, loss, rouge, em = SCORES[round][a]
        metrics = {"eval_loss": loss, "eval_rouge_l": rouge, "eval_em": em, "seconds": 0.5}
        if side:
            metrics |= {"emulator_eval_loss": SIDE[a], "other": 1.0}
        h.send(a, TaskResult(run_id=t.run_id, round=round, task_id=t.task_id, agent_id=a,
                             method="fedit", kind="eval", num_examples=n, metrics=metrics))  # fmt: skip


def _run(tmp_path: Path, side: bool = False) -> Harness:
    h = Harness(tmp_path, rounds=1, eval=True, eval_initial=True)
    for a in ("a", "b"):
        h.hello(a)
    _answer_evals(h, next_tasks(h, "eval"), 0)
    tasks = next_tasks(h, "train")
    for a, v in (("a", 1.0), ("b", 2.0)):
        h.result(tasks[a], a, 5, lora_state(v))
    _answer_evals(h, next_tasks(h, "eval"), 1, side)
    h.tick()
    assert h.engine.finished
    h.close()
    return h


def test_eval_rows_per_agent_and_weighted_aggregate_round_0_included(tmp_path: Path) -> None:
    _run(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        evals = ledger.evals("run-t")
    assert [e["round"] for e in evals] == [0, 1]
    assert evals[0]["agents"]["b"] == {
        "examples": 1.0, "eval_loss": 3.0, "eval_rouge_l": 0.6, "eval_em": 1.0,
    }  # fmt: skip
    assert "seconds" not in evals[0]["agents"]["a"]
    # example-weighted over a (3 examples) and b (1)
    agg = evals[1]["aggregate"]
    assert agg["examples"] == 4.0
    assert agg["eval_rouge_l"] == (3 * 0.5 + 0.9) / 4
    assert agg["eval_loss"] == (3 * 1.0 + 2.0) / 4 and agg["eval_em"] == (3 * (1 / 3) + 1.0) / 4


def test_status_and_report_show_every_evaluation(tmp_path: Path) -> None:
    _run(tmp_path)
    out = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines()]
    assert ["0", "b", "1", "3.0000", "0.6000", "1.000"] in lines
    assert ["1", "all", "(weighted)", "4", "1.2500", "0.6000", "0.500"] in lines
    data = json.loads(
        CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path), "--json"]).output
    )
    assert [e["round"] for e in data["evals"]] == [0, 1]
    files = write_report(tmp_path, tmp_path / "report")
    page = files.html.read_text()
    assert page.count('<td class="text">all (weighted)</td>') == 2
    assert "<td>0.3000</td>" in page  # round 0's weighted Rouge-L: (3*0.2 + 0.6) / 4


def test_side_eval_metrics_are_kept_beside_the_columns_never_in_them(tmp_path: Path) -> None:
    """FedBiOT's ``emulator_eval_loss`` reaches the round's summary, the ledger's round metrics and
    its evaluation rows, example-weighted; the columns stay the full model's; unknown keys drop."""
    h = _run(tmp_path, side=True)
    last = h.summaries[-1]
    assert last.round == 1 and last.eval_side == {"emulator_eval_loss": (3 * 4.0 + 8.0) / 4}
    assert last.eval_loss == (3 * 1.0 + 2.0) / 4
    assert last.as_metrics()["emulator_eval_loss"] == 5.0 and "other" not in last.as_metrics()
    assert h.summaries[0].eval_side == {}  # round 0's agents reported none
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        evals = ledger.evals("run-t")
        rounds = {r.round: r.metrics for r in ledger.rounds("run-t")}
    assert evals[1]["aggregate"]["emulator_eval_loss"] == 5.0
    assert evals[1]["agents"]["b"]["emulator_eval_loss"] == 8.0
    assert "other" not in evals[1]["agents"]["b"]
    assert "emulator_eval_loss" not in evals[0]["aggregate"]
    assert rounds[1]["emulator_eval_loss"] == 5.0 and rounds[1]["eval_loss"] == 1.25
