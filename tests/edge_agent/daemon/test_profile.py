"""Machine profile: the keys Hello carries, their types and plausible values."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch

from edge_agent.daemon.profile import collect_profile, matmul_gflops
from protocol.messages import Profile

KEYS = {
    "hostname": str,
    "os": str,
    "python": str,
    "torch": str,
    "cpus": int,
    "ram_total": int,
    "ram_available": int,
    "disk_free": int,
    "gpus": list,
    "matmul_gflops_fp32": float,
    "matmul_gflops_bf16": float,
}


def test_measured_profile_has_exactly_the_keys_and_plausible_values(tmp_path: Path) -> None:
    start = time.perf_counter()
    profile = collect_profile(measure=True, disk_path=tmp_path)
    elapsed = time.perf_counter() - start
    assert set(profile) == set(KEYS)
    for key, kind in KEYS.items():
        assert type(profile[key]) is kind, key
    assert profile["torch"] == torch.__version__
    assert 1 <= profile["cpus"] <= (os.cpu_count() or 1)  # type: ignore[operator]
    assert 2**27 < profile["ram_total"] < 2**50  # type: ignore[operator]
    assert 0 < profile["ram_available"] <= profile["ram_total"]  # type: ignore[operator]
    free = psutil.disk_usage(str(tmp_path)).free
    assert abs(profile["disk_free"] - free) < max(free // 20, 2**26)  # type: ignore[operator]
    assert profile["matmul_gflops_fp32"] > 0.1  # type: ignore[operator]
    assert profile["matmul_gflops_bf16"] > 0.01  # type: ignore[operator]
    assert elapsed < 3.0  # budget 0.5 s; slack for a loaded CI machine
    # What the daemon sends in Hello must validate.
    Profile.model_validate_json(json.dumps(profile))


def test_unmeasured_profile_reports_zero_throughput_quickly() -> None:
    start = time.perf_counter()
    profile = collect_profile(measure=False)
    assert time.perf_counter() - start < 0.5
    assert profile["matmul_gflops_fp32"] == 0.0
    assert profile["matmul_gflops_bf16"] == 0.0
    assert set(profile) == set(KEYS)


def test_disk_free_of_a_path_not_created_yet_is_its_parents(tmp_path: Path) -> None:
    profile = collect_profile(measure=False, disk_path=tmp_path / "state" / "not-yet")
    free = psutil.disk_usage(str(tmp_path)).free
    assert abs(profile["disk_free"] - free) < max(free // 20, 2**26)  # type: ignore[operator]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_means_an_empty_list() -> None:
    assert collect_profile(measure=False)["gpus"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpus_are_listed_with_memory() -> None:
    gpus = collect_profile(measure=False)["gpus"]
    assert isinstance(gpus, list) and len(gpus) == torch.cuda.device_count()
    for i, gpu in enumerate(gpus):
        assert gpu["index"] == i
        assert 0 < gpu["memory_free"] <= gpu["memory_total"]


def test_matmul_gflops_is_consistent_with_a_timed_matmul() -> None:
    measured = matmul_gflops(torch.float32)
    n = 256
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    direct = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    # Same order of magnitude (the box is shared, so timings wobble).
    assert direct / 20 < measured < direct * 20
