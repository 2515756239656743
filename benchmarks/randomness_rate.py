"""Rate of the shared-randomness generator (protocol/randomness.py), numpy and torch, one run.

Draws N Rademacher signs (float32) and N mask decisions at density 0.01 with each backend and
prints seconds and values per second side by side. N is 100 M by default, 1 M with --quick.

    python benchmarks/randomness_rate.py [--quick] [--n N] [--repeat R] [--torch-threads T]
                                         [--device cpu|cuda]

The best of R repeats is reported (the machine may be shared). The 100 M signs are a 400 MB
float32 array per backend; the mask keeps only its ~1 M indices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from protocol import randomness as R

KEY = R.stream_key(12345, "model.layers.0.mlp.down_proj.weight")
DENSITY = 0.01


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeat: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        del result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 M values instead of 100 M")
    parser.add_argument("--n", type=int, default=None, help="values per draw (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the best is reported")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    args = parser.parse_args()
    n = args.n if args.n is not None else (1_000_000 if args.quick else 100_000_000)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    dev = args.device

    # Warm up (allocators, thread pools, CUDA context) on a small draw.
    R.rademacher(KEY, 1 << 16)
    R.mask_indices(KEY, 1 << 16, DENSITY)
    R.rademacher_torch(KEY, 1 << 16, device=dev)
    R.mask_indices_torch(KEY, 1 << 16, DENSITY, device=dev)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("rademacher numpy float32", lambda: R.rademacher(KEY, n)),
        (f"rademacher torch/{dev} float32", lambda: R.rademacher_torch(KEY, n, device=dev)),
        ("mask p=0.01 numpy", lambda: R.mask_indices(KEY, n, DENSITY)),
        (f"mask p=0.01 torch/{dev}", lambda: R.mask_indices_torch(KEY, n, DENSITY, device=dev)),
        ("uniform numpy float64", lambda: R.uniform(KEY, n)),
        (f"uniform torch/{dev} float64", lambda: R.uniform_torch(KEY, n, device=dev)),
    ]
    print(
        f"n = {n:,} per draw, best of {args.repeat}; cpus = {os.cpu_count()}, "
        f"torch threads = {torch.get_num_threads()}, load average = {os.getloadavg()[0]:.2f}"
    )
    print(f"{'draw':32s} {'seconds':>9s} {'values/s':>12s}")
    for name, fn in cases:
        seconds = best_time(fn, args.repeat, dev)
        print(f"{name:32s} {seconds:9.3f} {n / seconds:12.3e}")


if __name__ == "__main__":
    main()
