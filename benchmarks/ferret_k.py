"""Ferret's seed pool K: cost, memory and quality of one group's projection and reconstruction.

For each K, one parameter group of the given shape (SmolLM2-135M's MLP matrices are 576 x 1536)
and a Gaussian update Δ of norm 1 (the estimator's error depends on |Δ| only):

- the agent's projection on all K bases (``_ferret_math.project``, as the group with the largest
  update gets K seeds) and the server's rebuild of the step (``_ferret_math.apply_step``), each
  timed, and the peak resident memory above the start (sampled every 2 ms) while each runs;
- the quality of the rebuilt step ŝ: cosine with Δ and |ŝ| / |Δ| (clip off, server lr 1;
  theory for Rademacher bases: |ŝ|/|Δ| ≈ sqrt((d + K) / K), cosine ≈ sqrt(K / (d + K))).

A dense K x d basis matrix, what the code never builds, is printed beside for scale.

    python benchmarks/ferret_k.py [--quick] [--ks 32,256,2048,4096] [--shape 576x1536]
                                  [--threads 1]

Then the one-round probe (``benchmarks/_ferret_probe.py``): loss drop from the agents' true
mean update against the drop from the step rebuilt from their coefficients, per K, on a real
model (the embedded SmolLM2-135M; a tiny random Llama with --quick):

    python benchmarks/ferret_k.py --probe [--probe-ks 32,256] [--agents 2] [--steps 8]
                                  [--probe-data DIR[,DIR...]]

``--probe-data``: run the probe on prepared splits (``edgefed-aggregator data
natural-instructions``, e.g. the scoreboard's ``seed-0,seed-1,seed-2``: each split's seed is the
run seed, its token budget sets ``max_len``) instead of the demo set, then print per K the
share of the true update's loss drop the rebuilt step reached, mean ± sd over the splits.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch

from protocol.methods.ferret import math as fm

BASE_SEED = fm.pool_base_seed(0)


class PeakRss:
    """Peak resident set size above the start, sampled every 2 ms on a thread."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak MB above the start of one call."""
    with PeakRss() as rss:
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
    return seconds, rss.above_mb


def one_k(delta: torch.Tensor, layout: fm.Layout, k: int) -> dict[str, float]:
    g = layout.groups[0]
    d = g.numel
    keys = [(s, fm.basis_key(BASE_SEED, s, g.name)) for s in range(k)]
    gammas: list[float] = []
    project_s, project_mb = timed(lambda: gammas.extend(fm.project(delta, keys, k)))
    step = torch.zeros(d)
    group = torch.zeros(k, dtype=torch.int32)
    seed = torch.arange(k, dtype=torch.int32)
    value = torch.tensor(gammas, dtype=torch.float32)

    def rebuild() -> None:
        fm.apply_step(
            {g.members[0].name: step}, layout, BASE_SEED, group, seed, value,
            server_lr=1.0, clip_norm=1e6,
        )  # fmt: skip

    rebuild_s, rebuild_mb = timed(rebuild)
    cosine = float(torch.dot(step, delta) / (step.norm() * delta.norm()))
    return {
        "k": k,
        "project_s": project_s,
        "project_mb": project_mb,
        "rebuild_s": rebuild_s,
        "rebuild_mb": rebuild_mb,
        "signs_per_s": 2 * k * d / (project_s + rebuild_s),
        "cosine": cosine,
        "norm_ratio": float(step.norm() / delta.norm()),
        "theory_cosine": math.sqrt(k / (d + k)),
        "theory_ratio": math.sqrt((d + k) / k),
        "dense_mb": k * d * 4 / 2**20,
    }


def cost_table(shape: tuple[int, int], ks: list[int]) -> list[dict[str, float]]:
    layout = fm.build_layout({"model.layers.0.mlp.up_proj.weight": shape})
    d = layout.numel
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=gen)
    delta /= delta.norm()
    print(f"group {shape[0]}x{shape[1]} (d = {d:,}), Gaussian update of norm 1, {len(ks)} K values")
    print(
        f"{'K':>6} {'project s':>10} {'rebuild s':>10} {'signs/s':>9} {'peak MB':>8} "
        f"{'dense KxD MB':>13} {'cosine':>8} {'theory':>8} {'|s|/|Δ|':>8} {'theory':>8}"
    )
    rows = []
    for k in ks:
        r = one_k(delta, layout, k)
        rows.append(r)
        print(
            f"{k:>6} {r['project_s']:>10.2f} {r['rebuild_s']:>10.2f} {r['signs_per_s']:>9.2e} "
            f"{max(r['project_mb'], r['rebuild_mb']):>8.1f} {r['dense_mb']:>13,.0f} "
            f"{r['cosine']:>8.4f} {r['theory_cosine']:>8.4f} {r['norm_ratio']:>8.2f} "
            f"{r['theory_ratio']:>8.2f}",
            flush=True,
        )
    return rows


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small group and K (CI)")
    ap.add_argument("--ks", type=ints, default=[32, 256, 2048, 4096])
    ap.add_argument("--shape", default="576x1536")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="also the one-round loss probe")
    ap.add_argument("--probe-ks", type=ints, default=[32, 256])
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--probe-data", default="", help="split dirs, comma-separated (not demo)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, cols = (int(x) for x in args.shape.split("x"))
    ks = args.ks
    if args.quick:
        rows, cols, ks = 64, 128, [4, 32]
    cost_table((rows, cols), ks)
    if args.probe or args.quick:
        from benchmarks._ferret_probe import print_probe

        splits = [Path(d) for d in args.probe_data.split(",") if d] or [None]
        runs = [
            print_probe(
                quick=args.quick,
                ks=[2, 16] if args.quick else args.probe_ks,
                agents=args.agents,
                steps=2 if args.quick else args.steps,
                lr=args.lr,
                split_dir=split,
            )
            for split in splits
        ]
        if len(runs) > 1:
            print_shares(runs)


def print_shares(runs: list[list[Any]]) -> None:
    """Per K: the rebuilt step's loss drop as a share of the true update's, over the runs."""
    print(f"\nshare of the true update's loss drop, over {len(runs)} splits (mean ± sd; per split)")
    labels = [r.label for r in runs[0] if r.label.startswith("K=")]
    for label in labels:
        shares = []
        for rows in runs:
            by = {r.label: r for r in rows}
            shares.append(by[label].drop / by["true"].drop)
        sd = statistics.stdev(shares) if len(shares) > 1 else float("nan")
        each = " / ".join(f"{s:.3f}" for s in shares)
        print(f"{label:>8} {statistics.mean(shares):.3f} ± {sd:.3f}   ({each})")


if __name__ == "__main__":
    main()
