"""One aggregator per state dir: a second one is refused before it opens the ledger (two
would adopt the same run, cut the same update log at start-up and answer each other's admin
requests); the lock goes with the first's end, or its process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_harness import MODEL, SHA

from aggregator.engine.service import AggregatorService
from aggregator.errors import ConfigError
from aggregator.ops.config import build_config
from aggregator.store.statedir import LOCK_NAME, StateDirLock


def _config(state: Path):  # type: ignore[no-untyped-def]
    raw = {
        "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(state)},
        "security": {"insecure": True},
        "run": {"run_id": "r", "model_sha256": SHA, "eval": False},
        "method": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}},
    }
    return build_config(raw)


def test_a_second_service_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    first = AggregatorService(_config(tmp_path), MODEL, serve_runs=True)
    with pytest.raises(ConfigError, match=rf"in use by another aggregator \(pid {os.getpid()}\)"):
        AggregatorService(_config(tmp_path), MODEL, serve_runs=True)
    first.should_exit.set()
    assert first.run() == 0  # its end releases the lock
    second = AggregatorService(_config(tmp_path), MODEL, serve_runs=True)
    second.should_exit.set()
    assert second.run() == 0


def test_the_lock_goes_with_a_killed_process(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; "
        "from aggregator.store.statedir import StateDirLock; "
        f"lock = StateDirLock(Path({str(tmp_path)!r})); print('locked', flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"pid {proc.pid}"):
            StateDirLock(tmp_path)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    StateDirLock(tmp_path).release()  # SIGKILL dropped it
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
