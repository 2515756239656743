"""``local``: each agent's data file is named for it, and result.json counts trained rounds."""

from __future__ import annotations

from pathlib import Path

from aggregator.engine.rounds import RoundSummary
from aggregator.local.run import _named_for_agents, trained_rounds


def test_agent_n_trains_on_agent_n_jsonl(tmp_path: Path) -> None:
    files = {}
    for i in range(3):
        files[f"agent-{i}"] = tmp_path / f"agent-{i}.jsonl"
        files[f"agent-{i}"].write_text(f"records of split {i}\n", encoding="utf-8")
    named = _named_for_agents(files, ["agent-1", "agent-2", "agent-3"])
    assert named == {f"agent-{i + 1}": tmp_path / f"agent-{i + 1}.jsonl" for i in range(3)}
    for i in range(3):  # nothing overwritten on the way: split i is agent-(i+1)'s
        assert named[f"agent-{i + 1}"].read_text(encoding="utf-8") == f"records of split {i}\n"
    assert not (tmp_path / "agent-0.jsonl").exists()


def test_result_counts_rounds_not_the_initial_evaluation() -> None:
    rows = [RoundSummary(round=r) for r in range(4)]  # row 0 + 3 rounds
    assert trained_rounds(rows) == 3
    assert trained_rounds(rows[1:]) == 3  # a run without the initial evaluation


def test_row_0_shows_the_time_it_really_took() -> None:
    import io

    from aggregator.local.round_table import RoundTable

    now = [100.0]
    out = io.StringIO()
    table = RoundTable(out, clock=lambda: now[0])
    now[0] = 168.0  # agents started, loaded the model and evaluated the initial point
    table(RoundSummary(round=0, eval_loss=2.5))
    table(RoundSummary(round=1, agents=2, seconds=12.5))
    rows = out.getvalue().splitlines()[1:]
    assert rows[0].split()[-1] == "68.0"
    assert rows[1].split()[-1] == "12.5"


def test_a_side_eval_metric_is_printed_after_the_methods_own() -> None:
    import io

    from aggregator.local.round_table import RoundTable

    out = io.StringIO()
    table = RoundTable(out)
    table(
        RoundSummary(
            round=1,
            agents=2,
            eval_loss=1.75,
            method={"full_eval_loss": 1.5},
            eval_side={"emulator_eval_loss": 3.21234},
        )
    )
    row = out.getvalue().splitlines()[1].split()
    assert row[3] == "1.7500"  # the eval loss column: the full model's
    assert row[-2:] == ["full_eval_loss=1.5", "emulator_eval_loss=3.2123"]
