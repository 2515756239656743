"""The benchmark scripts run in their --quick mode, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("wire_overhead.py", "target <= 0.1% overhead for the >= 1 MB LoRA message"),
        ("randomness_rate.py", "rademacher numpy"),
        ("aggregator_throughput.py", "edgefed / pickle updates/s"),
        ("bytes_per_round.py", "up = TaskResult + update blob"),
        ("load_harness.py", "upstream took 2 updates  sent 10 recorded 10 lost 0"),
        ("convergence.py", "centralised      1"),
        ("against_flower.py", "      2 edgefed"),
        ("agent_memory.py", "nf4 "),
        ("step_overhead.py", "ratio agent / plain"),
        ("ferret_k.py", "K=16"),
        ("ferret_rounds.py", " round  linear     3.333"),
    ],
)
def test_benchmark_quick_mode(script: str, expect: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expect in proc.stdout
