"""SIGKILL the aggregator (a real ``serve`` process) at every point of a round, restart it, and
the run finishes with the same agent processes, no operator action, every update counted once.

The kill comes from the aggregator itself (:mod:`aggregator.engine.crashpoints`, armed by the
``EDGEFED_CRASH_AT`` environment variable of the first process only), so it lands exactly at the
named point. Two agents on a tiny random Llama, two rounds, quorum 1.0 (a round closes only
with both updates: a lost or refused-and-forgotten result would hang it, as it once did).

Time: about 30-60 s per point on 2 busy CPU cores. CI runs ``upload``, ``group`` and ``stored``
(the points where a result is in flight, written but not committed inside a group, or durable
but unacknowledged); ``EDGEFED_ALL_CRASH_POINTS=1`` runs all seven.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from federation import Federation, free_port, ledger_of, serve, stop, toml_text, wait_for

from aggregator.engine.crashpoints import ENV, POINTS

pytestmark = pytest.mark.slow

QUICK = ("upload", "group", "stored")
ALL = os.environ.get("EDGEFED_ALL_CRASH_POINTS") == "1"


@pytest.mark.parametrize(
    "point",
    [
        p
        if p in QUICK or ALL
        else pytest.param(p, marks=pytest.mark.skip(reason="EDGEFED_ALL_CRASH_POINTS=1 runs it"))
        for p in POINTS
    ],
)
def test_sigkill_at_each_point_of_a_round_then_restart_finishes_the_run(
    point: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fed = Federation(tmp_path, tiny_model_dir, 2, rounds=2, eval=False)
    port = free_port()
    fed.raw["server"]["bind"] = f"tcp://127.0.0.1:{port}"
    fed.raw["run"]["quorum"] = 1.0
    if point == "training":  # long enough that a heartbeat reports progress mid-training
        fed.raw["method"]["train"]["steps"] = 40
    config = tmp_path / "aggregator.toml"
    config.write_text(toml_text(fed.raw), encoding="utf-8")
    log = tmp_path / "aggregator.log"
    endpoint = f"tcp://127.0.0.1:{port}"

    agg = serve(config, log, {ENV: f"{point}@2"})
    try:
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id, endpoint)
        wait_for(lambda: agg.poll() is not None, 240, f"the crash at {point}", fed)
        assert agg.returncode == -9, fed.logs()
        assert f"SIGKILL at {point} of round 2" in log.read_text()
        agg = serve(config, log)
        with ledger_of(fed) as ledger:
            wait_for(lambda: ledger.last_committed_round("it") == 2, 240, "round 2", fed)
        assert all(p.poll() is None for p in fed.procs.values()), "an agent died"
    finally:
        code = stop(agg)
        fed.stop_all()
    assert code == 0, fed.logs()
    with ledger_of(fed) as ledger:
        for r in (1, 2):  # one accepted update per agent per round: none lost, none twice
            assert sorted(u.agent_id for u in ledger.updates("it", r)) == fed.agent_ids
    text = log.read_text()
    # a kill mid-commit leaves round 2's checkpoint: the restart finishes that commit
    assert f"resumes after committed round {2 if point == 'commit' else 1}" in text
    assert "Traceback" not in text
