"""Natural Instructions out of a bigbench-shaped archive built here: reader, budget, splits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main
from aggregator.data.natural_instructions import in_order, read_subtasks
from aggregator.data.split import NISplit, make_ni_split, within_budget
from aggregator.errors import ConfigError
from edge_agent.training.data import load_jsonl

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"


def _task(name: str, n: int, *, long_every: int = 0) -> dict[str, object]:
    examples = []
    for i in range(n):
        words = 40 if long_every and i % long_every == 0 else 3
        examples.append(
            {"input": " ".join([f"{name[:10]}-{i}"] * words), "target": [f"ans {i}", f"alt {i}"]}
        )
    return {
        "name": name,
        "task_prefix": f"Definition: do the task {name}.",
        "examples": examples,
        "metrics": ["rouge"],
    }


def _archive(tmp_path: Path, tasks: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        members = {f"{ROOT}/{name}/task.json": json.dumps(t) for name, t in tasks.items()}
        members[f"{ROOT}/task.json"] = json.dumps({"name": "natural_instructions"})
        members["bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json"] = "{}"
        for member, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


NAMES = [f"subtask{i:03d}_t{i}" for i in range(1, 7)]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    tasks = {name: _task(name, 30, long_every=5 if i == 0 else 0) for i, name in enumerate(NAMES)}
    return _archive(tmp_path, tasks)


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def test_reader_finds_subtasks_by_name_or_number_with_all_references(archive: Path) -> None:
    found = read_subtasks(archive, ["subtask002_t2", "3", "subtask004"])
    assert list(found) == ["subtask002_t2", "subtask003_t3", "subtask004_t4"]
    t3 = found["subtask003_t3"]
    assert t3.instruction == "Definition: do the task subtask003_t3."
    assert len(t3.examples) == 30
    assert t3.examples[7] == ("subtask003-7 subtask003-7 subtask003-7", ("ans 7", "alt 7"))
    assert [t.name for t in in_order(["4", "subtask002_t2"], found)] == [
        "subtask004_t4",
        "subtask002_t2",
    ]
    assert len(read_subtasks(archive)) == 6  # the umbrella task.json and other tasks ignored


def test_reader_names_unknown_subtasks(archive: Path) -> None:
    with pytest.raises(ConfigError, match=r"no Natural Instructions subtask '99', 'subtask077'"):
        read_subtasks(archive, ["1", "99", "subtask077"])


def test_token_budget_skips_long_examples_and_counts_them(archive: Path) -> None:
    task = read_subtasks(archive, ["1"])["subtask001_t1"]
    # instruction 5 words + input 3 or 40 words + "ans i" 2 words: 10 or 47
    kept, report = within_budget([task], 10, words)
    assert report == {"subtask001_t1": {"kept": 24, "over_budget": 6}}
    assert all(int(r["input"].split()[0].split("-")[1]) % 5 for r in kept["subtask001_t1"])
    _, report = within_budget([task], 9, words)
    assert report["subtask001_t1"] == {"kept": 0, "over_budget": 30}
    _, report = within_budget([task], 47, words)
    assert report["subtask001_t1"] == {"kept": 30, "over_budget": 0}


def _split(archive: Path, **kw: object) -> NISplit:
    tasks = in_order(NAMES, read_subtasks(archive))
    args: dict[str, object] = dict(
        agents=2, per_agent=8, n_eval=8, n_public=6, public_tasks=2, split="task",
        alpha=0.5, seed=3, budget=10, count=words,
    )  # fmt: skip
    return make_ni_split(tasks, **(args | kw))  # type: ignore[arg-type]


def test_task_split_gives_each_agent_its_own_subtasks(archive: Path) -> None:
    split = _split(archive)
    held, public = NAMES[:4], NAMES[4:]
    assert [{r["task"] for r in a} for a in split.agents] == [
        {held[0], held[2]},
        {held[1], held[3]},
    ]
    assert [len(a) for a in split.agents] == [8, 8]
    assert {r["task"] for r in split.public} == set(public)
    assert split.meta["eval"] == {n: 2 for n in held}
    records = [r for a in split.agents for r in a]
    keys = [(r["task"], r["input"]) for r in records]
    eval_keys = {(r["task"], r["input"]) for r in split.eval}
    assert len(set(keys)) == len(keys) and not set(keys) & eval_keys
    assert all(r["output"] == r["references"][0] for r in records)
    # the budget held everywhere: subtask001's long inputs never appear
    assert all(len(r["input"].split()) == 3 for r in records + split.eval)
    assert split.meta["budget"]["subtask001_t1"] == {"kept": 24, "over_budget": 6}


def test_task_split_needs_a_subtask_per_agent(archive: Path) -> None:
    with pytest.raises(ConfigError, match="5 agents need at least 5 held subtasks, have 4"):
        _split(archive, agents=5)


def test_dirichlet_split_mixes_and_is_deterministic(archive: Path) -> None:
    a = _split(archive, split="dirichlet", alpha=100.0, agents=3, per_agent=12)
    b = _split(archive, split="dirichlet", alpha=100.0, agents=3, per_agent=12)
    assert a.agents == b.agents
    # a large alpha: every agent sees at least three of the four held subtasks
    assert all(len({r["task"] for r in s}) >= 3 for s in a.agents)
    c = _split(archive, split="dirichlet", alpha=100.0, agents=3, per_agent=12, seed=4)
    assert c.agents != a.agents


def test_running_out_of_examples_says_where(archive: Path) -> None:
    with pytest.raises(ConfigError, match="agent 1's training set from subtask001_t1: needs"):
        _split(archive, per_agent=60)


def test_command_writes_files_edgefed_loads(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    args = ["data", "natural-instructions", "--out", str(out), "--archive", str(archive),
            "--tasks", "1,2,3,4,5,6", "--agents", "2", "--per-agent", "8", "--eval", "8",
            "--public", "6", "--max-tokens", "10", "--tokenizer", "words"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "token budget 10 (words): 174 examples fit, 6 skipped as too long" in result.output
    assert len(load_jsonl(out / "agent-0.jsonl")) == 8
    assert len(load_jsonl(out / "eval.jsonl")) == 8
    assert len(load_jsonl(out / "public.jsonl")) == 6
    meta = json.loads((out / "meta.json").read_text())
    assert meta["public_tasks"] == NAMES[4:] and meta["budget_tokens"] == 10
    bad = CliRunner().invoke(main, [*args[:-6], "--tasks", "1,77", "--tokenizer", "words"])
    assert bad.exit_code == 2 and "no Natural Instructions subtask '77'" in bad.output
