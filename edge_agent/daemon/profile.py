"""What this machine offers: CPUs, memory, disk, GPUs and measured matmul throughput.

:func:`collect_profile` returns the plain dict that goes into ``Hello.profile`` (validated there
by ``protocol.messages.Profile``) and that ``edgefed-agent profile`` prints. Bandwidth and RTT
to the aggregator are measured by the link, not here.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

CPU_BUDGET_S = 0.2
"""Time spent timing matmuls per dtype on CPU (two dtypes: at most ~0.5 s in all)."""
GPU_BUDGET_S = 0.2
CPU_SIZE = 384
GPU_SIZE = 4096
_MAX_NAME = 256  # protocol.messages.MAX_NAME


def collect_profile(*, measure: bool = True, disk_path: Path | None = None) -> dict[str, object]:
    """This machine's profile; ``measure=False`` skips the matmul timings (reported as 0.0).

    ``disk_path`` is where free disk is measured (default: the model cache directory); a path
    that does not exist yet is measured at its nearest existing parent.
    """
    from edge_agent.model.store import default_cache_dir

    memory = psutil.virtual_memory()
    gpus = _gpus()
    fp32 = bf16 = 0.0
    if measure:
        device = "cuda:0" if gpus else "cpu"
        fp32 = matmul_gflops(torch.float32, device)
        bf16 = matmul_gflops(torch.bfloat16, device)
    return {
        "hostname": _name(socket.gethostname()),
        "os": _name(platform.platform()),
        "python": platform.python_version(),
        "torch": _name(torch.__version__),
        "cpus": _cpus(),
        "ram_total": int(memory.total),
        "ram_available": int(memory.available),
        "disk_free": _disk_free(disk_path or default_cache_dir()),
        "gpus": gpus,
        "matmul_gflops_fp32": fp32,
        "matmul_gflops_bf16": bf16,
    }


def _name(text: str) -> str:
    return (text or "unknown")[:_MAX_NAME]


def _cpus() -> int:
    """CPUs this process may run on (its affinity), not all the host has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _disk_free(path: Path) -> int:
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(psutil.disk_usage(str(probe)).free)
    except OSError as exc:
        logger.warning("cannot measure free disk at %s: %s", probe, exc)
        return 0


def _gpus() -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return []
    out: list[dict[str, object]] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        total = int(props.total_memory)
        try:
            free, total_reported = torch.cuda.mem_get_info(index)
            free, total = int(free), int(total_reported)
        except RuntimeError as exc:  # driver without cudaMemGetInfo: what torch has not taken
            logger.debug("mem_get_info(%d) failed: %s", index, exc)
            free = max(0, total - int(torch.cuda.memory_reserved(index)))
        out.append(
            {"index": index, "name": _name(props.name), "memory_total": total, "memory_free": free}
        )
    return out


def matmul_gflops(dtype: torch.dtype, device: str = "cpu") -> float:
    """Measured square-matmul throughput in GFLOP/s (2·n³ per product), within a small budget."""
    cuda = device.startswith("cuda")
    n = GPU_SIZE if cuda else CPU_SIZE
    budget = GPU_BUDGET_S if cuda else CPU_BUDGET_S
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.rand(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.rand(n, n, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        sync()
        iterations = 0
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < budget:
            torch.mm(a, b)
            iterations += 1
            if cuda and iterations % 8:
                continue  # synchronise in batches so launches overlap
            sync()
            elapsed = time.perf_counter() - start
    sync()
    elapsed = time.perf_counter() - start
    return round(2.0 * n**3 * iterations / elapsed / 1e9, 3)
