"""``local --data``: the demo set, a prepared split directory, and what a split asks of methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.errors import AggregatorError
from aggregator.local.data import method_overrides, prepare_local_data
from edge_agent.training.data import load_jsonl


def _prepared(tmp_path: Path, agents: int = 2, n_eval: int = 5) -> Path:
    src = tmp_path / "split"
    src.mkdir()
    for i in range(agents):
        rec = {"instruction": f"task {i}", "input": "x", "output": "y", "references": ["y", "z"]}
        (src / f"agent-{i}.jsonl").write_text(json.dumps(rec) + "\n")
    evals = [{"instruction": "e", "input": str(k), "output": str(k)} for k in range(n_eval)]
    (src / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (src / "public.jsonl").write_text(json.dumps(evals[0]) + "\n")
    (src / "meta.json").write_text(json.dumps({"budget_tokens": 200, "max_reference_tokens": 9}))
    return src


def test_a_split_dir_is_sharded_per_agent_and_sets_the_budget(tmp_path: Path) -> None:
    data = prepare_local_data(
        str(_prepared(tmp_path)), tmp_path / "run", agents=2, per_agent=4, n_eval=0, alpha=1.0,
        seed=0,
    )  # fmt: skip
    assert [p.name for p in data.train] == ["agent-0.jsonl", "agent-1.jsonl"]
    shards = [[ex.response for ex in load_jsonl(p)] for p in data.eval_shards]
    assert shards == [["0", "2", "4"], ["1", "3"]] and data.eval_size == 5
    assert all(p.parent == tmp_path / "run" for p in [*data.train, *data.eval_shards])
    assert method_overrides(data) == {
        "train": {"max_len": 232},
        "eval": {"max_len": 232, "max_new_tokens": 13},
    }


def test_a_split_dir_for_fewer_agents_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AggregatorError, match=r"has no agent-2.jsonl for 3 agents"):
        prepare_local_data(
            str(_prepared(tmp_path)), tmp_path / "run", agents=3, per_agent=4, n_eval=0,
            alpha=1.0, seed=0,
        )  # fmt: skip


def test_unknown_data_name_says_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(AggregatorError, match="expected 'demo', 'natural-instructions' or a dir"):
        prepare_local_data(
            "nope", tmp_path / "run", agents=1, per_agent=4, n_eval=2, alpha=1.0, seed=0
        )


def test_demo_stays_the_default_shape(tmp_path: Path) -> None:
    data = prepare_local_data(
        "demo", tmp_path / "run", agents=2, per_agent=8, n_eval=6, alpha=0.5, seed=1
    )
    assert [len(load_jsonl(p)) for p in data.train] == [8, 8]
    assert [len(load_jsonl(p)) for p in data.eval_shards] == [3, 3]
    assert method_overrides(data) == {}
