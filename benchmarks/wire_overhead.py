"""Bytes on the wire for each payload kind, against the raw tensor bytes they carry.

Run: ``python benchmarks/wire_overhead.py [--quick]``. Shapes follow SmolLM2-135M (30 layers,
hidden 576, k/v out 192, MLP 1536). Prints, per payload: tensors, raw tensor bytes, encoded
bytes, overhead (bytes and % of raw), the dense update the payload stands for, and encode /
decode times (median of a few runs). The LoRA row is also written as a plain one-entry-per-tensor
safetensors file (``safetensors.torch.save``) side by side, to show what stacking saves.
Target: at most 0.1% overhead for the >= 1 MB LoRA payload. Message framing (signature and
header frame) comes on top and is measured elsewhere.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import randomness
from protocol.frames import encode, frames_nbytes
from protocol.messages import TaskResult
from protocol.payloads import (
    decode,
    encode_dense,
    encode_lora,
    encode_masked,
    encode_seedcoef,
    encode_sparse,
)

LAYERS, HIDDEN, KV, MLP = 30, 576, 192, 1536
ATTN = (("q", HIDDEN), ("k", KV), ("v", KV), ("o", HIDDEN))
DENSE_SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def lora_state(layers: int, ranks: Callable[[int], int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(layers):
        r = ranks(layer)
        for module, out in ATTN:
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}_proj"
            state[f"{p}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=g)
            state[f"{p}.lora_B.weight"] = torch.randn(out, r, generator=g)
    return state


def dense_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{layer}.{name}.weight": shape
        for layer in range(layers)
        for name, shape in DENSE_SHAPES.items()
    }


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


ROW = "{:<34} {:>7} {:>13} {:>13} {:>10} {:>9} {:>14} {:>8} {:>8}"


def report(label: str, data: bytes, stands_for: int, repeats: int, enc_ms: float) -> float:
    p = decode(data)
    dec_ms = timed(lambda: decode(data), repeats)
    overhead = len(data) - p.raw_nbytes
    pct = 100.0 * overhead / p.raw_nbytes
    print(
        ROW.format(
            label,
            len(p.tensors),
            f"{p.raw_nbytes:,}",
            f"{len(data):,}",
            f"{overhead:,}",
            f"{pct:.4f}%",
            f"{stands_for:,}",
            f"{enc_ms:.1f}",
            f"{dec_ms:.1f}",
        )
    )
    return pct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    dense_layers = 2 if args.quick else LAYERS
    print(
        ROW.format(
            "payload", "tensors", "raw B", "encoded B", "overhead", "ovh %", "dense update B",
            "enc ms", "dec ms",
        )
    )  # fmt: skip

    # LoRA, SmolLM2-135M attention, rank 8 everywhere (FedIT, SLoRA stage 2)
    lora = lora_state(LAYERS, lambda _: 8)
    full = sum(HIDDEN * out for _, out in ATTN) * LAYERS * 4
    data = encode_lora(lora, method="fedit", round=1)
    enc = timed(lambda: encode_lora(lora, method="fedit", round=1), repeats)
    report("lora r=8 (30 layers x q,k,v,o)", data, full, repeats, enc)
    meta = {"edgefed.kind": "lora", "edgefed.method": "fedit", "edgefed.round": "1"}
    plain = st_save(lora, metadata=meta)
    enc = timed(lambda: st_save(lora, metadata=meta), repeats)
    report("  same, one entry per tensor", plain, full, repeats, enc)

    # LoRA with per-layer ranks (FedPipe): fewer equal shapes to stack
    mixed = lora_state(LAYERS, lambda layer: (4, 8, 16)[layer % 3])
    data = encode_lora(mixed, method="fedpipe", round=1)
    enc = timed(lambda: encode_lora(mixed, method="fedpipe", round=1), repeats)
    report("lora r=4/8/16 by layer", data, full, repeats, enc)

    # SLoRA stage 1: seeded mask at 1% over every dense layer, values only
    shapes = dense_shapes(dense_layers)
    numel = sum(math.prod(s) for s in shapes.values())
    seed, density = 2024, 0.01
    index = {
        name: torch.from_numpy(
            randomness.mask_indices(randomness.stream_key(seed, name), math.prod(shape), density)
        )
        for name, shape in shapes.items()
    }
    values = {name: torch.randn(len(idx)) for name, idx in index.items()}
    data = encode_masked(values, shapes, seed=seed, density=density, method="slora", round=1)
    enc = timed(
        lambda: encode_masked(values, shapes, seed=seed, density=density, method="slora", round=1),
        repeats,
    )
    report(f"masked 1% ({dense_layers} layers, 7 mats)", data, numel * 4, repeats, enc)
    idx32 = {name: idx.to(torch.int32) for name, idx in index.items()}
    data = encode_sparse(idx32, values, shapes, method="slora", round=1)
    enc = timed(lambda: encode_sparse(idx32, values, shapes, method="slora", round=1), repeats)
    report("  same as sparse int32 pairs", data, numel * 4, repeats, enc)

    # Ferret: 7 groups per layer, K = 4096 seeds, ~64 coefficients per group
    n_groups, k = LAYERS * 7, 4096
    g = torch.Generator().manual_seed(1)
    group = torch.arange(n_groups, dtype=torch.int32).repeat_interleave(64)
    seed_index = torch.stack(
        [torch.randperm(k, generator=g)[:64] for _ in range(n_groups)]
    ).reshape(-1)
    value = torch.randn(group.numel(), generator=g)

    def seedcoef() -> bytes:
        return encode_seedcoef(
            group, seed_index, value, base_seed=7, k=k, n_groups=n_groups, method="ferret", round=1
        )

    data = seedcoef()
    enc = timed(seedcoef, repeats)
    all_numel = sum(math.prod(s) for s in dense_shapes(LAYERS).values())
    report("seedcoef (210 groups x 64 seeds)", data, all_numel * 4, repeats, enc)

    # FedBiOT emulator layers, dense float32
    emu_layers = 1 if args.quick else 4
    emulator = {name: torch.randn(shape) for name, shape in dense_shapes(emu_layers).items()}
    data = encode_dense(emulator, method="fedbiot", round=0)
    enc = timed(lambda: encode_dense(emulator, method="fedbiot", round=0), repeats)
    emu_bytes = sum(t.nbytes for t in emulator.values())
    report(f"dense emulator ({emu_layers} layers)", data, emu_bytes, repeats, enc)

    # the whole message: signature + TaskResult header frame + the payload blob
    lora_blob = encode_lora(lora, method="fedit", round=1)
    header = TaskResult(
        run_id="run-1",
        round=1,
        task_id="r1-train-0123456789abcdef01234567",
        agent_id="edge-1",
        method="fedit",
        num_examples=64,
        metrics={"train_loss": 1.2345, "train_loss_last": 0.9876, "steps": 12.0},
    )
    frames = encode(header, {"update": lora_blob})
    on_wire = frames_nbytes(frames)
    raw = sum(t.nbytes for t in lora.values())
    msg_pct = 100 * (on_wire - raw) / raw
    print(
        f"\nwhole TaskResult message with the LoRA payload: {on_wire:,} B on the wire for "
        f"{raw:,} B of tensors: overhead {on_wire - raw:,} B = {msg_pct:.4f}% "
        f"(header frame {len(frames[1]):,} B)"
    )
    verdict = "met" if msg_pct <= 0.1 else "NOT met"
    print(f"target <= 0.1% overhead for the >= 1 MB LoRA message: {msg_pct:.4f}% ({verdict})")
    return 0 if msg_pct <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
