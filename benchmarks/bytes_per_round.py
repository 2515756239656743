"""Bytes per round per agent, per method, against a full fp32 update and a plain peft LoRA file.

Run: ``python benchmarks/bytes_per_round.py [--quick]``. For each model shape and method it
prints the upload (``TaskResult`` + ``update`` blob) and download (``TaskAssign`` + global blob,
a round >= 2) message sizes in bytes, as ``protocol.frames.encode`` lays them out, and their
ratio to the full fp32 update of the model (4 bytes per parameter, a tied embedding once) and
to a plain peft LoRA state dict of the same rank (one entry per tensor, ``safetensors.torch.save``).

SmolLM2-135M is encoded for real. The LLaMA shapes are computed on paper with the same formula,
``raw tensor bytes + header bytes``, where the header is measured by encoding the same tensor
names with tiny shapes (same layers, hidden 64): no large tensor is allocated. The formula is
checked against the real encoding of SmolLM2-135M (the ``check`` lines); it is off by the few
digits that larger offsets and shapes add to the JSON header. Masked (SLoRA stage 1) value
counts on paper are ``round(density * numel)``; the real ones are drawn from the seeded mask.
Ferret is exact for every shape: the group count comes from the real grouping rule, and the
payload holds the upper bound K x groups triples (K = 32), not a measured count.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import randomness
from protocol.frames import encode, frames_nbytes
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods.fedbiot.emulator import plan_emulator
from protocol.methods.ferret import math as fm
from protocol.payloads import encode_lora, encode_masked, encode_seedcoef

RANK, DENSITY, SEED, K = 8, 0.01, 0, 32
TARGETS = ("q", "k", "v", "o")
MODEL = BaseModelRef(name="model", sha256="ab" * 32)


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    kv: int
    mlp: int
    vocab: int
    tied: bool

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of every LoRA / SLoRA target."""
        out = {"q": self.hidden, "k": self.kv, "v": self.kv, "o": self.hidden}
        return {
            f"model.layers.{i}.self_attn.{m}_proj.weight": (out[m], self.hidden)
            for i in range(self.layers)
            for m in TARGETS
        }

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of all seven projections of every layer (FedPipe's candidates)."""
        mlp = {"gate": (self.mlp, self.hidden), "up": (self.mlp, self.hidden),
               "down": (self.hidden, self.mlp)}  # fmt: skip
        return self.target_shapes() | {
            f"model.layers.{i}.mlp.{m}_proj.weight": s
            for i in range(self.layers)
            for m, s in mlp.items()
        }

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        h = self.hidden
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}"
            shapes |= {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.mlp.gate_proj.weight": (self.mlp, h),
                f"{p}.mlp.up_proj.weight": (self.mlp, h),
                f"{p}.mlp.down_proj.weight": (h, self.mlp),
            }
        shapes |= self.target_shapes()
        shapes["model.norm.weight"] = (h,)
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def tiny(self) -> Shape:
        """Same names, tiny dimensions: for measuring header bytes."""
        return replace(self, hidden=64, kv=max(8, 64 * self.kv // self.hidden), mlp=128, vocab=64)


SMOL = Shape("SmolLM2-135M", 30, 576, 192, 1536, 49152, True)
PAPER = (
    Shape("LLaMA-1B (TinyLlama-1.1B)", 22, 2048, 256, 5632, 32000, False),
    Shape("LLaMA-7B", 32, 4096, 4096, 11008, 32000, False),
    Shape("LLaMA-13B", 40, 5120, 5120, 13824, 32000, False),
)


LORA_HEADER_GUESS = 3_000
"""Safetensors header bytes of a stacked LoRA payload (measured ~2-3 KB for these names)."""


def lora_state(shape: Shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out, inp) in shape.target_shapes().items():
        p = "base_model.model." + name.removesuffix(".weight")
        state[f"{p}.lora_A.weight"] = torch.randn(RANK, inp, generator=g)
        state[f"{p}.lora_B.weight"] = torch.randn(out, RANK, generator=g)
    return state


def lora_raw(shape: Shape) -> int:
    return 4 * RANK * sum(out + inp for out, inp in shape.target_shapes().values())


def masked_payload(shape: Shape) -> bytes:
    shapes = shape.target_shapes()
    values = {
        n: torch.randn(randomness.mask_count(randomness.stream_key(SEED, n), math.prod(s), DENSITY))
        for n, s in shapes.items()
    }
    return encode_masked(values, shapes, seed=SEED, density=DENSITY, method="slora", round=2)


def masked_raw_paper(shape: Shape) -> int:
    return 4 * sum(round(DENSITY * math.prod(s)) for s in shape.target_shapes().values())


def n_groups(shape: Shape) -> int:
    return len(fm.build_layout(shape.all_shapes()).groups)


def seedcoef_payload(shape: Shape) -> bytes:
    groups = n_groups(shape)
    g = torch.Generator().manual_seed(1)
    group = torch.arange(groups, dtype=torch.int32).repeat_interleave(K)
    seed = torch.arange(K, dtype=torch.int32).repeat(groups)
    value = torch.randn(group.numel(), generator=g)
    return encode_seedcoef(
        group, seed, value, base_seed=7, k=K, n_groups=groups, method="ferret", round=2
    )


def up_message(payload: bytes, method: str) -> int:
    header = TaskResult(
        run_id="run-1",
        round=2,
        task_id="r2-train-0123456789abcdef01234567",
        agent_id="edge-1",
        method=method,
        num_examples=64,
        metrics={"train_loss": 1.2345, "train_loss_last": 0.9876, "steps": 12.0},
    )
    return frames_nbytes(encode(header, {"update": payload}))


def down_message(payload: bytes, method: str) -> int:
    header = TaskAssign(
        run_id="run-1", round=2, task_id="r2-train-0123456789abcdef01234567", method=method,
        model=MODEL, params={"lora": {"r": RANK, "alpha": 16.0}}, deadline_s=600.0,
    )  # fmt: skip
    return frames_nbytes(encode(header, {"global": payload}))


def header_of(data: bytes, raw: int) -> int:
    return len(data) - raw


@dataclass(frozen=True)
class Sizes:
    lora: int
    masked: int
    plain_lora: int
    seedcoef: int
    full: int
    groups: int


def exact_sizes(shape: Shape) -> Sizes:
    lora = lora_state(shape)
    return Sizes(
        lora=len(encode_lora(lora, method="fedit", round=2)),
        masked=len(masked_payload(shape)),
        plain_lora=len(st_save(lora)),
        seedcoef=len(seedcoef_payload(shape)),
        full=4 * sum(math.prod(s) for s in shape.all_shapes().values()),
        groups=n_groups(shape),
    )


def paper_sizes(shape: Shape) -> Sizes:
    tiny = shape.tiny()
    tiny_lora = lora_state(tiny)
    lora_h = header_of(encode_lora(tiny_lora, method="fedit", round=2), lora_raw(tiny))
    plain_h = header_of(st_save(tiny_lora), lora_raw(tiny))
    masked = masked_payload(tiny)
    tiny_raw = 4 * sum(
        randomness.mask_count(randomness.stream_key(SEED, n), math.prod(s), DENSITY)
        for n, s in tiny.target_shapes().items()
    )
    return Sizes(
        lora=lora_raw(shape) + lora_h,
        masked=masked_raw_paper(shape) + header_of(masked, tiny_raw),
        plain_lora=lora_raw(shape) + plain_h,
        seedcoef=len(seedcoef_payload(shape)),
        full=4 * sum(math.prod(s) for s in shape.all_shapes().values()),
        groups=n_groups(shape),
    )


ROW = "{:<28} {:<16} {:>15} {:>15} {:>12} {:>12}"


def report(shape: Shape, sizes: Sizes, how: str) -> None:
    print(f"\n{shape.name} ({how}): full fp32 update {sizes.full:,} B; plain peft LoRA r={RANK} "
          f"{sizes.plain_lora:,} B; Ferret groups {sizes.groups}")  # fmt: skip
    print(ROW.format("method", "payload", "up B", "down B", "up/fp32", "up/peft"))
    rows = (
        ("fedit", "lora", sizes.lora),
        ("slora stage 1", "masked", sizes.masked),
        ("slora stage 2", "lora", sizes.lora),
        (f"ferret (K={K} x groups)", "seedcoef", sizes.seedcoef),
    )
    for method, kind, payload_len in rows:
        wire = method.split()[0]
        fake = b"\0" * payload_len  # framing only depends on the blob's length
        up, down = up_message(fake, wire), down_message(fake, wire)
        print(
            ROW.format(
                method, kind, f"{up:,}", f"{down:,}",
                f"{up / sizes.full:.2e}", f"{up / sizes.plain_lora:.4f}",
            )
        )  # fmt: skip
    # FedPipe: LoRA on the selected half of the 7 projections of every layer, rank per agent
    # from 2 to 16 (the planner's grid): the smallest half at rank 2 .. the largest at rank 16
    mats = sorted(o + i for o, i in shape.projection_shapes().values())
    half = len(mats) // 2
    lo, hi = 4 * 2 * sum(mats[:half]), 4 * 16 * sum(mats[-half:])
    lo_up, hi_up = (up_message(b"\0" * (n + LORA_HEADER_GUESS), "fedpipe") for n in (lo, hi))
    print(ROW.format("fedpipe (r 2..16, half)", "lora", f"{lo_up:,}..{hi_up:,}", "same",
                     f"{lo_up / sizes.full:.1e}..{hi_up / sizes.full:.1e}",
                     f"{lo_up / sizes.plain_lora:.2f}..{hi_up / sizes.plain_lora:.2f}"))  # fmt: skip
    # FedBiOT: LoRA r=8 on q,k,v,o of the 2 adapter layers up; down adds the alignment delta
    # (bf16, LoRA r=4 on o_proj and down_proj of each emulator layer); the emulator once (bf16)
    plan = plan_emulator(shape.layers, 2, 0.5)
    per_layer = sum(o + i for o, i in list(shape.target_shapes().values())[:4])
    adapter = 4 * RANK * per_layer * 2
    delta = 2 * 4 * plan.n_emulator * ((shape.hidden + shape.hidden) + (shape.mlp + shape.hidden))
    up = up_message(b"\0" * (adapter + LORA_HEADER_GUESS), "fedbiot")
    down = down_message(b"\0" * (adapter + delta + 2 * LORA_HEADER_GUESS), "fedbiot")
    kept = (plan.n_emulator + 2) / shape.layers
    full_params = sizes.full // 4
    layer_params = sum(math.prod(v) for k, v in shape.all_shapes().items() if ".layers.0." in k)
    emulator_params = full_params - round((1 - kept) * shape.layers) * layer_params
    print(ROW.format("fedbiot", "lora (+delta)", f"{up:,}", f"{down:,}",
                     f"{up / sizes.full:.2e}", f"{up / sizes.plain_lora:.4f}"))  # fmt: skip
    print(
        f"{'':<28} emulator once: {plan.n_emulator} of {shape.layers - 2} bottom layers, "
        f"{2 * emulator_params:,} B in bf16 ({emulator_params / full_params:.3f} of the "
        "parameters)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 and LLaMA-1B only")
    args = parser.parse_args()
    exact = exact_sizes(SMOL)
    report(SMOL, exact, "encoded")
    est = paper_sizes(SMOL)
    worst = 0.0
    print("\ncheck of the paper formula on SmolLM2-135M (estimate - encoded):")
    for label, a, b in (
        ("lora", est.lora, exact.lora),
        ("masked", est.masked, exact.masked),
        ("plain peft", est.plain_lora, exact.plain_lora),
    ):
        rel = (a - b) / b
        worst = max(worst, abs(rel))
        print(f"  {label:<11} {a:>12,} - {b:>12,} = {a - b:>+7,} B ({100 * rel:+.4f}%)")
    for shape in PAPER[:1] if args.quick else PAPER:
        report(shape, paper_sizes(shape), "on paper")
    print(
        "\nup = TaskResult + update blob; down = TaskAssign + global blob of a round >= 2 "
        "(round 1 sends no global). Ferret down: the aggregated triples, at most K x groups."
    )
    return 0 if worst < 0.01 else 1  # masked counts on paper are expected, not drawn


if __name__ == "__main__":
    sys.exit(main())
