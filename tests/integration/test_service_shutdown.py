"""SIGTERM on a serving aggregator mid-run keeps everything it acknowledged, and the restarted
service finishes the run; ``serve`` on a finished run's state dir says so and stays up.

The same two agent processes live through all three aggregator processes; an agent told the
aggregator is going away logs no error while it waits for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from federation import Federation, free_port, ledger_of, serve, stop, toml_text, wait_for

from aggregator.runs.admin_client import admin_path
from aggregator.runs.state import RunBook
from aggregator.store.ledger import UpdateRow

pytestmark = pytest.mark.slow


def updates(fed: Federation) -> dict[str, UpdateRow]:
    with ledger_of(fed) as ledger:
        return {u.task_id: u for r in (1, 2) for u in ledger.updates("it", r)}


def test_sigterm_mid_run_keeps_acknowledged_updates_and_a_finished_run_waits(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    fed = Federation(tmp_path, tiny_model_dir, 2, rounds=2, eval=False)
    port = free_port()
    fed.raw["server"]["bind"] = f"tcp://127.0.0.1:{port}"
    fed.raw["run"]["quorum"] = 1.0
    config = tmp_path / "aggregator.toml"
    config.write_text(toml_text(fed.raw), encoding="utf-8")
    log = tmp_path / "aggregator.log"
    state = tmp_path / "state"

    agg = serve(config, log)
    try:
        wait_for(lambda: admin_path(state).exists(), 60, "the service to listen", fed)
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id, f"tcp://127.0.0.1:{port}")
        wait_for(lambda: len(updates(fed)) >= 1, 240, "a first acknowledged update", fed)
        assert stop(agg) == 0, log.read_text()[-3000:]
        before = updates(fed)
        assert "shutting down: 2 agents told" in log.read_text()

        agg = serve(config, log)
        # up before it is stopped again (the tiny run may have finished before the first SIGTERM)
        listening = "aggregator listening on"
        wait_for(lambda: log.read_text().count(listening) >= 2, 120, "the restart to listen", fed)
        with ledger_of(fed) as ledger:
            book = RunBook(ledger, state)
            wait_for(lambda: book.info("it").status == "finished", 240, "the run to finish", fed)
        after = updates(fed)
        assert all(after[t].sha256 == row.sha256 for t, row in before.items())  # kept, as is
        assert sorted(u.agent_id for u in after.values()) == sorted(fed.agent_ids * 2)
        assert stop(agg) == 0

        agg = serve(config, log)  # the run is finished: say so, stay up for the next one
        wait_for(lambda: "run it is finished" in log.read_text(), 120, "the finished notice", fed)
        wait_for(lambda: admin_path(state).exists(), 60, "the admin socket", fed)
        assert agg.poll() is None
        assert all(p.poll() is None for p in fed.procs.values()), fed.logs()
    finally:
        code = stop(agg)
        agent_codes = [stop(p) for p in fed.procs.values()]
    assert (code, agent_codes) == (0, [0, 0]), fed.logs()
    with ledger_of(fed) as ledger:
        assert ledger.last_committed_round("it") == 2
    for agent_id in fed.agent_ids:
        text = (tmp_path / f"{agent_id}.log").read_text()
        assert "aggregator said bye (aggregator shutting down); waiting for it" in text
        assert " ERROR " not in text and "Traceback" not in text, text
