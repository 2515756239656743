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


@pytest.mark.slow
def test_scoreboard_quick_mode() -> None:
    """Four configurations (fedit and fedavg, two seeds each) through the real system on a tiny
    model: longer than the others, so on its own deadline."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scoreboard.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| fedavg fp32 lr=0.01 | 2 |" in proc.stdout
    assert "| fedit nf4 lr=0.001 | 2 |" in proc.stdout
