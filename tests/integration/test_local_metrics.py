"""The Prometheus endpoints (the aggregator's and each agent's) serve their metrics during an
`edgefed-aggregator local` run (on the tiny model)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return str(reply.read().decode())


def test_metrics_are_scraped_during_a_local_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "aggregator", "local", "--insecure",
        "--model", str(tiny_model_dir), "--quant", "fp32",
        "--agents", "1", "--rounds", "3", "--steps", "2", "--per-agent", "8",
        "--eval-examples", "4", "--batch-size", "2", "--workdir", str(tmp_path / "run"),
        "--metrics-port", "0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    url, agent_url, scraped, agent_scraped, seen = None, None, "", "", []
    try:
        for line in proc.stdout:
            seen.append(line)
            found = re.match(r"metrics: (http://127\.0\.0\.1:\d+/metrics)$", line.strip())
            if found:
                url = found.group(1)
            found = re.match(
                r"agent metrics: agent-1 (http://127\.0\.0\.1:\d+/metrics)$", line.strip()
            )
            if found:
                agent_url = found.group(1)
            if url and re.match(r"^\s+1\s+1\s", line):  # round 1's row: round 2 is under way
                scraped = _get(url)
                assert agent_url, "".join(seen)
                agent_scraped = _get(agent_url)
                break
        assert scraped, "".join(seen)
    finally:
        proc.send_signal(signal.SIGINT)  # local stops its agent processes on the way out
        proc.wait(120)
        proc.stdout.close()
    values = dict(re.findall(r"^(edgefed_aggregator_\w+(?:\{[^}]*\})?) (\S+)$", scraped, re.M))
    assert float(values["edgefed_aggregator_rounds_completed_total"]) >= 2  # row 0 and round 1
    assert float(values['edgefed_aggregator_updates_accepted_total{kind="train"}']) >= 1
    assert float(values["edgefed_aggregator_agents_connected"]) == 1
    assert float(values["edgefed_aggregator_bytes_received_total"]) > 0
    assert float(values["edgefed_aggregator_checkpoint_write_seconds_count"]) >= 1
    agent = dict(re.findall(r"^(edgefed_agent_\w+(?:\{[^}]*\})?) (\S+)$", agent_scraped, re.M))
    assert float(agent["edgefed_agent_connected"]) == 1
    assert float(agent['edgefed_agent_tasks_completed_total{kind="train"}']) >= 1
    assert float(agent['edgefed_agent_tasks_completed_total{kind="eval"}']) >= 1  # row 0
    assert float(agent["edgefed_agent_result_bytes_total"]) > 0
    assert float(agent["edgefed_agent_train_loss"]) > 0
