"""One ``serve`` process, two runs back to back, the same agent processes (never restarted).

The first run is the one of serve's config file; the second is submitted with ``runs submit``
while the first runs, and a third is submitted and stopped before it starts. Both runs' rounds
and exports are reached by run id afterwards; the agents say once that a run is over and log
no error while they wait; SIGTERM ends every daemon with exit code 0.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from federation import Federation, free_port, ledger_of, serve, stop, toml_text, wait_for

from aggregator.runs.admin_client import admin_path
from aggregator.runs.state import RunBook

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def run_file(path: Path, fed: Federation, run_id: str) -> Path:
    raw: dict[str, Any] = {"run": {**fed.raw["run"], "run_id": run_id}, "method": fed.raw["method"]}
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


def test_one_serve_runs_two_submitted_runs_with_the_same_agents(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    fed = Federation(tmp_path, tiny_model_dir, 2, rounds=1, eval=True)
    port = free_port()
    fed.raw["server"]["bind"] = f"tcp://127.0.0.1:{port}"
    fed.raw["run"]["run_id"] = "a"
    fed.raw["run"]["quorum"] = 1.0  # every agent's update and evaluation, however slow
    fed.raw["run"]["export_dir"] = str(tmp_path / "export-a")
    config = tmp_path / "aggregator.toml"
    config.write_text(toml_text(fed.raw), encoding="utf-8")
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"

    agg = serve(config, log)
    try:
        wait_for(lambda: admin_path(state).exists(), 60, "the admin socket", fed)
        assert stat.S_IMODE(admin_path(state).stat().st_mode) == 0o600
        assert stat.S_IMODE(admin_path(state).parent.stat().st_mode) == 0o700
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id, f"tcp://127.0.0.1:{port}")
        pids = {a: p.pid for a, p in fed.procs.items()}

        done = cli(
            "runs",
            "submit",
            "--state-dir",
            str(state),
            str(run_file(tmp_path / "b.toml", fed, "b")),
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("submitted run b"), done.stdout
        c = cli(
            "runs",
            "submit",
            "--state-dir",
            str(state),
            str(run_file(tmp_path / "c.toml", fed, "c")),
        )
        assert c.returncode == 0, c.stderr
        stopped = cli("runs", "stop", "--state-dir", str(state), "c")
        assert (stopped.returncode, stopped.stdout.strip()) == (0, "run c: stopped"), stopped
        busy = cli("runs", "resume", "--state-dir", str(state), "a")  # running or finished
        assert busy.returncode == 2, busy
        assert "only a failed or stopped run can be resumed" in busy.stderr, busy
        again = cli("runs", "submit", "--state-dir", str(state), str(tmp_path / "b.toml"))
        assert again.returncode == 2 and "run b exists already" in again.stderr, again

        with ledger_of(fed) as ledger:
            book = RunBook(ledger, state)
            wait_for(lambda: book.info("b").status == "finished", 300, "run b to finish", fed)
        listed = cli("runs", "list", "--state-dir", str(state), "--json")
        assert listed.returncode == 0, listed.stderr
        statuses = {r["run_id"]: r["status"] for r in json.loads(listed.stdout)}
        assert statuses == {"a": "finished", "b": "finished", "c": "stopped"}
        assert {a: p.pid for a, p in fed.procs.items()} == pids
        assert all(p.poll() is None for p in fed.procs.values()), fed.logs()
        shown = cli("runs", "show", "--state-dir", str(state), "a", "--json")
        assert json.loads(shown.stdout)["rounds"][0]["committed"] is True
    finally:
        code = stop(agg)
        agent_codes = [stop(p) for p in fed.procs.values()]
    assert code == 0, log.read_text()[-3000:]
    assert agent_codes == [0, 0], fed.logs()

    with ledger_of(fed) as ledger:
        for run_id in ("a", "b"):
            assert ledger.last_committed_round(run_id) == 1
            assert sorted(u.agent_id for u in ledger.updates(run_id, 1)) == fed.agent_ids
        assert ledger.rounds("c") == []
    # each run in its own folder: the second never overwrote the first's checkpoint
    assert (state / "checkpoints" / "round-000001").is_dir()
    assert (state / "runs" / "b" / "checkpoints" / "round-000001").is_dir()
    assert (tmp_path / "export-a" / "adapter" / "adapter_model.safetensors").exists()
    for run_id in ("a", "b"):
        out = tmp_path / f"out-{run_id}"
        exported = cli("export", "--state-dir", str(state), "--run", run_id, "--out", str(out))
        assert exported.returncode == 0, exported.stderr
        assert f"exported run {run_id} round 1" in exported.stdout
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        status = cli("status", "--state-dir", str(state), "--run", run_id, "--json")
        data = json.loads(status.stdout)
        assert data["lifecycle"]["status"] == "finished"
        assert sorted(data["agent_evals"]) == fed.agent_ids
    text = cli("status", "--state-dir", str(state)).stdout  # the latest run: c
    assert "status: stopped (stopped by the operator)" in text
    missing = cli("status", "--state-dir", str(state), "--run", "zz")
    assert missing.returncode == 2 and "no run 'zz'" in missing.stderr

    for agent_id in fed.agent_ids:
        agent_log = (tmp_path / f"{agent_id}.log").read_text()
        assert agent_log.count("run a: run finished; staying connected") == 1, agent_log
        assert agent_log.count("run b: run finished; staying connected") == 1, agent_log
        assert "welcomed to run b" in agent_log
        assert " ERROR " not in agent_log and "Traceback" not in agent_log, agent_log
