"""`edgefed-aggregator local --regions`: the local run with its agents behind regional tiers,
every region and agent its own process, CURVE on, on the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from aggregator.errors import AggregatorError
from aggregator.local.options import LocalOptions
from aggregator.local.regions import deal
from aggregator.local.run import run_local
from aggregator.store.ledger import Ledger

pytestmark = pytest.mark.slow


def options(tmp_path: Path, model: Path, regions: int) -> LocalOptions:
    return LocalOptions(
        method="fedit", agents=3, rounds=2, workdir=tmp_path / "run", model=str(model),
        alpha=0.5, per_agent=8, steps=1, batch_size=2, lr=1e-3, rank=4, quant="fp32",
        insecure=False, merge=False, seed=0, eval_examples=6, regions=regions,
    )  # fmt: skip


def test_agents_are_dealt_in_blocks() -> None:
    assert deal(["a", "b", "c"], 2) == {"region-1": ["a", "b"], "region-2": ["c"]}
    with pytest.raises(AggregatorError, match="between 1 and --agents"):
        deal(["a"], 2)


def test_local_runs_behind_two_regions(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = io.StringIO()
    result = run_local(options(tmp_path, tiny_model_dir, 2), out)
    text = out.getvalue()
    assert "3 agents behind 2 regions" in text and "exported PEFT adapter:" in text
    rows = {r["round"]: r for r in result["rows"]}
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["agents"] == 2.0 and rows[2]["agents"] == 2.0  # the two regions
    assert 0 < rows[2]["eval_loss"] < 20  # evaluated by all three agents, through the regions
    work = tmp_path / "run"
    members = {"region-1": ["agent-1", "agent-2"], "region-2": ["agent-3"]}
    with Ledger(work / "state" / "ledger.sqlite") as up:
        up_run = up.latest_run()
        assert up_run is not None
        for rnd in (1, 2):
            taken = {u.agent_id: u.num_examples for u in up.updates(up_run, rnd)}
            assert sorted(taken) == sorted(members)
            for region, agents in members.items():
                with Ledger(work / region / "state" / "ledger.sqlite") as led:
                    run = led.latest_run()
                    assert run is not None
                    mine = {u.agent_id: u.num_examples for u in led.updates(run, rnd)}
                assert sorted(mine) == agents  # each agent trained in its region
                assert taken[region] == sum(mine.values())  # and the upstream got the total
