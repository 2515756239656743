"""Ferret's upload per agent per round under secure aggregation, against plain Ferret triples.

Run: ``python benchmarks/ferret_secagg_bytes.py [--quick]``. Under secure aggregation a Ferret
agent masks the dense (group, seed) coefficient grid (:mod:`protocol.methods.ferret.grid`):
``n_groups × K`` ring elements of 8 bytes, plus the ``layout`` blob, in the train task's
``TaskResult``. Plain Ferret sends 12 bytes per (group, seed, coefficient) triple for its own
draw of ``n_g`` seeds per group, from 2 per group (``min``) to K per group (``max``). Every
message is encoded with :func:`protocol.frames.encode` exactly as the agent wrappers build it
(before CURVE's 16-byte box per frame). The group counts come from the real grouping rule
(:func:`protocol.methods.ferret.math.build_layout`) on each model's parameter shapes.

Not counted here, the same at every K: the three extra SecAgg+ stages (advertise, share,
unmask; about 1-2 KB per agent at 3-10 agents, see ``benchmarks/secagg_cost.py``). The step
sent down is the same as plain Ferret's: the aggregated triples, non-zero where some agent
drew the seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bytes_per_round import PAPER, SMOL, Shape

from protocol.frames import encode, frames_nbytes
from protocol.messages import TaskResult
from protocol.methods.ferret import grid
from protocol.methods.ferret import math as fm
from protocol.payloads import encode_seedcoef
from protocol.secagg import wire

KS = (32, 256, 2048)
BASE_SEED = 2**63 + 12345  # a 64-bit base seed, as long in the layout as a real one


def _result(blobs: dict[str, bytes]) -> int:
    header = TaskResult(
        run_id="run-1",
        round=2,
        task_id="r2-train.0123abcd-0123456789abcdef01234567",
        agent_id="edge-1",
        method="ferret",
        num_examples=64,
        metrics={"train_loss": 1.2345, "train_loss_last": 0.9876, "steps": 12.0,
                 "triples": 1470.0, "update_norm": 0.01, "held_round": 1.0},
    )  # fmt: skip
    return frames_nbytes(encode(header, blobs))


def masked_upload(groups: int, k: int) -> int:
    layout = grid.grid_layout(BASE_SEED, k, groups)
    ring = np.random.default_rng(0).integers(0, 2**63, size=groups * k, dtype=np.uint64)
    blobs = {wire.MASKED_BLOB: wire.vector_bytes(ring), wire.LAYOUT_BLOB: wire.layout_blob(layout)}
    return _result(blobs)


def plain_upload(groups: int, k: int, per_group: int) -> int:
    group = torch.arange(groups, dtype=torch.int32).repeat_interleave(per_group)
    seed = torch.arange(per_group, dtype=torch.int32).repeat(groups)
    value = torch.randn(group.numel(), generator=torch.Generator().manual_seed(1))
    blob = encode_seedcoef(
        group, seed, value, base_seed=BASE_SEED, k=k, n_groups=groups, method="ferret", round=2
    )
    return _result({"update": blob})


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M only, K = 32 and 256")
    args = ap.parse_args()
    shapes: tuple[Shape, ...] = (SMOL,) if args.quick else (SMOL, *PAPER)
    ks = KS[:2] if args.quick else KS
    print("Ferret upload per agent per round (TaskResult message of the train task)")
    print(f"{'model':<26} {'groups':>6} {'K':>5} {'secure grid':>12} {'plain min':>10} "
          f"{'plain max':>10} {'grid / max':>10} {'grid / min':>10}")  # fmt: skip
    for shape in shapes:
        groups = len(fm.build_layout(shape.all_shapes()).groups)
        for k in ks:
            secure = masked_upload(groups, k)
            low, high = plain_upload(groups, k, 2), plain_upload(groups, k, k)
            print(
                f"{shape.name:<26} {groups:>6} {k:>5} {_size(secure):>12} {_size(low):>10} "
                f"{_size(high):>10} {secure / high:>10.2f} {secure / low:>10.1f}"
            )
    print(
        "secure grid = 8 bytes x groups x K + layout + header; plain = 12 bytes per triple + header"
    )


if __name__ == "__main__":
    main()
