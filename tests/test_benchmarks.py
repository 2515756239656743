"""The benchmark scripts run in their --quick mode, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        ("step_overhead.py", "ratio agent / plain"),
        ("secagg_cost.py", "secagg rows: the four stages' messages"),
        ("ferret_k.py", "K=16"),
        ("ferret_secagg_bytes.py", "secure grid = 8 bytes x groups x K"),
        ("ferret_rounds.py", " linear     3.333  "),
        ("fedpipe_scaling.py", "global nf4  lr=0.001  r=1  rslora  (x 5.66)"),
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


def test_agent_memory_quick_measures_every_method() -> None:
    """Each method's round-1 task, built by its server half, is measured (none "failed"), and
    FedBiOT's download carries the emulator bundle."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "agent_memory.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    memory, _, traffic = proc.stdout.partition("round-1 bytes per agent")
    assert "failed" not in memory, proc.stdout + proc.stderr[-3000:]
    rows = {line[:15].strip(): line.split() for line in memory.splitlines()[1:] if line.strip()}
    labels = ("fedit fp32", "fedit nf4", "fedavg", "slora", "fedpipe score", "fedpipe", "fedbiot")
    for label in (*labels, "ferret"):
        assert label in rows, proc.stdout
        peak = float(rows[label][-4])
        assert peak > 100, rows[label]  # MiB: a real process's high-water mark
    assert rows["fedbiot"][1] == "emu", rows["fedbiot"]  # it trains the emulator, not the base
    fedbiot = next(line for line in traffic.splitlines() if line.startswith("fedbiot"))
    down, bundle = fedbiot.split()[1:3], fedbiot.split()[3:5]
    assert down[1] == "MB" and bundle[1] == "MB" and float(bundle[0]) <= float(down[0]), fedbiot
    assert "stage 1" in traffic and "matrices r [" in traffic


GPU_CHECK = str(ROOT / "benchmarks" / "gpu_check.py")
FAST_PARTS = "load,profile,randomness,ferret,fedpipe"  # local is what test_local_e2e runs


def test_gpu_check_runs_on_cpu_and_names_what_it_skipped() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: test_gpu_check_on_cuda covers this machine")
    cmd = [sys.executable, GPU_CHECK, "--quick", "--parts", FAST_PARTS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "device cpu (no CUDA device)" in out
    assert "cpu: 16 reference vectors of randomness-v1.json regenerated, 0 differ" in out
    assert "skipped: the CUDA half: no CUDA device" in out
    assert "skipped: the GPU agent: no CUDA device (the CPU agent ran alone)" in out
    assert "skipped: torch.cuda.max_memory_allocated: no CUDA device" in out
    assert "\n  fp32 " in out and "\n  nf4 " in out  # a row per precision that ran
    assert "summary: load ran, profile ran, randomness ran, ferret ran, fedpipe ran" in out
    assert "CUDA parts skipped: no CUDA device here; the GPU half is unmeasured" in out


def test_gpu_check_skips_what_the_gpu_machine_lacks() -> None:
    # The GPU machine has no pyzmq, pydantic, click, psutil or bitsandbytes: None in
    # sys.modules makes each import fail there as it would.
    missing = ["zmq", "pydantic", "pydantic_core", "click", "psutil", "bitsandbytes", "scipy"]
    code = (
        f"import runpy, sys\nfor m in {missing!r}: sys.modules[m] = None\n"
        f"sys.argv = [{GPU_CHECK!r}, '--quick', '--parts', 'load,randomness,ferret,local']\n"
        f"runpy.run_path({GPU_CHECK!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "importable: zmq NO, pydantic NO, click NO, psutil NO, bitsandbytes NO" in out
    assert "skipped: nf4: bitsandbytes not importable" in out
    assert "== ferret: skipped" in out and "skipped: pydantic not importable" in out
    assert "skipped: zmq, pydantic, click, psutil not importable (see --bundle)" in out
    assert "cpu: 16 reference vectors of randomness-v1.json regenerated, 0 differ" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_on_cuda() -> None:
    cmd = [sys.executable, GPU_CHECK, "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device cuda:0" in proc.stdout
    assert "cuda: 16 reference vectors of randomness-v1.json regenerated, 0 differ" in proc.stdout
    assert "CPU agent vs GPU agent:" in proc.stdout


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
