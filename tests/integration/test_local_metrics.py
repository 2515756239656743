"""The Prometheus endpoint serves the metrics during an `edgefed-aggregator local` run."""

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


def test_metrics_are_scraped_during_a_local_run(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "aggregator", "local", "--insecure",
        "--agents", "1", "--rounds", "3", "--steps", "2", "--per-agent", "8",
        "--eval-examples", "4", "--batch-size", "2", "--workdir", str(tmp_path / "run"),
        "--metrics-port", "0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    url, scraped, seen = None, "", []
    try:
        for line in proc.stdout:
            seen.append(line)
            found = re.match(r"metrics: (http://127\.0\.0\.1:\d+/metrics)$", line.strip())
            if found:
                url = found.group(1)
            if url and re.match(r"^\s+1\s+1\s", line):  # round 1's row: round 2 is under way
                with urllib.request.urlopen(url, timeout=30) as reply:
                    scraped = reply.read().decode()
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
