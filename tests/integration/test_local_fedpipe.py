"""`edgefed-aggregator local --method fedpipe` on the tiny model: three agent processes behind
simulated links, each adapting its own matrices at its own ranks, chosen again in round 3."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from aggregator.errors import AggregatorError
from aggregator.local.options import LocalOptions, parse_agent_limits, parse_params
from aggregator.local.run import run_local

pytestmark = pytest.mark.slow


def test_fedpipe_plans_each_agent_and_reselects(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = parse_params(
        [
            "select.count=6",
            "select.every=2",
            "plan.ranks=[1,2,4,8]",
            "plan.batch_sizes=[1,2]",
            'plan.quants=["fp32"]',
            "plan.fit_memory=false",
            "score.batches=1",
            "score.max_len=32",
        ]
    )
    limits = parse_agent_limits(["agent-2:bandwidth=20", "agent-3:bandwidth=0.05"])
    opts = LocalOptions(
        method="fedpipe", agents=3, rounds=3, workdir=tmp_path / "run", model=str(tiny_model_dir),
        alpha=0.5, per_agent=8, steps=1, batch_size=2, lr=1e-3, rank=4, quant="fp32",
        insecure=True, merge=False, seed=0, eval_examples=6, method_params=params,
        agent_limits=limits,
    )  # fmt: skip
    out = io.StringIO()
    result = run_local(opts, out)
    rows = {r["round"]: r for r in result["rows"]}
    assert sorted(rows) == [0, 1, 2, 3]
    for r in (1, 2, 3):
        assert rows[r]["agents"] == 3.0 and 0 < rows[r]["eval_loss"] < 20
        assert 6 <= rows[r]["adapted_union"] <= 14  # each agent its own 6 of the 14
    assert rows[1]["reselected"] == 1.0 and rows[2]["reselected"] == 0.0
    assert rows[3]["reselected"] == 1.0
    state = tmp_path / "run" / "state" / "fedpipe"
    plans = {r: json.loads((state / f"plan-{r}.json").read_text()) for r in (1, 2, 3)}
    for r, plan in plans.items():
        assert sorted(plan) == ["agent-1", "agent-2", "agent-3"]
        assert all(len(p["ranks"]) == 6 for p in plan.values()), r
    # round 2 keeps each agent's matrices (its ranks may move with the adapters' sensitivity)
    assert all(set(plans[2][a]["ranks"]) == set(plans[1][a]["ranks"]) for a in plans[1])
    # the 0.05 Mbit/s agent carries the least rank
    total = {a: sum(p["ranks"].values()) for a, p in plans[2].items()}
    assert total["agent-3"] < total["agent-1"]


def test_an_agent_the_method_refuses_stops_a_local_run_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A local run's agents are all it will ever have: when the method refuses one (here
    FedPipe: not even its smallest configuration fits 100 MB) the run cannot start, and it says
    so instead of waiting for an agent that will never come."""
    opts = LocalOptions(
        method="fedpipe", agents=2, rounds=1, workdir=tmp_path / "run", model=str(tiny_model_dir),
        alpha=0.5, per_agent=4, steps=1, batch_size=1, lr=1e-3, rank=2, quant="fp32",
        insecure=True, merge=False, seed=0, eval_examples=2,
        method_params=parse_params(['plan.quants=["fp32"]', "score.batches=1"]),
        agent_limits=parse_agent_limits(["agent-2:memory=100MB"]),
    )  # fmt: skip
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_local(opts, io.StringIO())
        except BaseException as exc:  # checked below
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # before the fix this waited for ever
    thread.start()
    thread.join(600)  # a hang guard, not a timing: it stops in ~15 s
    assert not thread.is_alive(), "the local run is still waiting for an agent it refused"
    assert len(raised) == 1 and isinstance(raised[0], AggregatorError), raised
    message = str(raised[0])
    assert "cannot go on" in message and "needs 2 agents" in message
    assert "agent-2: fedpipe needs about" in message and "agent-1:" not in message
