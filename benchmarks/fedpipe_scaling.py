"""FedPipe's LoRA scaling at low rank: ``alpha / r`` against rank-stabilised ``alpha / sqrt(r·r0)``.

FedPipe gives every adapted matrix its own rank, down to 1. With peft's ``alpha / r`` scaling
and Adam (every entry moves by about ``lr`` per step), a module's early ``ΔW = (alpha/r)·B·A``
grows like ``alpha·lr/√r``: a rank-1 module moves √8 ≈ 2.8× faster than a rank-8 one at the
same ``lr``. Rank-stabilised LoRA (Kalajdzievski 2023, peft ``use_rslora``) scales by
``alpha/√r``; with ``lora_alpha = alpha/√r0`` it is ``alpha/√(r·r0)``, the same as ``alpha/r``
at the nominal rank ``r0 = 8`` (what fedit trains) and rank-independent in that sense.

Two scenarios on SmolLM2-135M (the embedded model), every decoder linear of the fedpipe
targets adapted at one rank, on the scoreboard's Natural Instructions split:

- ``fresh``: round 1, the seeded adapter (B = 0), ``--steps`` steps of batch ``--batch``.
- ``global``: round 2 as FedPipe runs it: an fp32 agent first trains rank 16 for 8 steps of
  batch 4 (round 1 of a fast agent); its ``ΔW`` is truncated to the rank being measured the way
  the server does (``protocol.methods.fedpipe.math``: ``global_factors``, then ``truncate``) and
  the measured agent trains from there.

Per run: training loss (first, max, mean of the last 4) and the held-out loss before and after.

Run: ``python benchmarks/fedpipe_scaling.py [--quick] [--data DIR] [--lrs 1e-3,3e-3]
[--quants fp32,nf4] [--ranks 1,8] [--scenarios fresh,global]``; ``--quick``: the tiny random
model of the tests and the demo data, 3 steps at one rate (a smoke test of the script, no
measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edge_agent.model.loader import load_base  # noqa: E402
from edge_agent.model.store import DEFAULT_MODEL, resolve_model  # noqa: E402
from edge_agent.training.data import load_jsonl  # noqa: E402
from edge_agent.training.lora import (  # noqa: E402
    LoraSpec,
    attach_lora,
    get_adapter_state,
    set_adapter_state,
)
from edge_agent.training.train import TrainConfig, _batch_order, evaluate, train_lora  # noqa: E402
from protocol.lora_init import initial_a  # noqa: E402
from protocol.methods.fedpipe import math as fm  # noqa: E402
from protocol.methods.fedpipe.spec import TARGETS  # noqa: E402

ALPHA = 16.0
R0 = 8
SCALINGS = ("alpha/r", "rslora")


def spec(rank: int, scaling: str) -> LoraSpec:
    """``alpha/r``: peft's default; ``rslora``: peft's ``use_rslora`` at ``alpha/√r0``."""
    if scaling == "alpha/r":
        return LoraSpec(rank, ALPHA, 0.0, TARGETS)
    return LoraSpec(rank, ALPHA / math.sqrt(R0), 0.0, TARGETS, rslora=True)


def module_scaling(rank: int, scaling: str) -> float:
    return ALPHA / rank if scaling == "alpha/r" else ALPHA / math.sqrt(R0 * rank)


def deltas(state: dict[str, torch.Tensor], rank: int, scaling: str) -> dict[str, torch.Tensor]:
    c = module_scaling(rank, scaling)
    return {
        m: c * (state[fm.keys(m)[1]].double() @ state[fm.keys(m)[0]].double())
        for m in fm.ranks_of(state)
    }


def truncated(
    delta: dict[str, torch.Tensor], rank: int, scaling: str, init_seed: int
) -> dict[str, torch.Tensor]:
    """What the server sends an agent at ``rank``: the best rank-r approximation of ``ΔW``."""
    out: dict[str, torch.Tensor] = {}
    for m, d in delta.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        keep = int((s > fm.RANK_RTOL * float(s[0])).sum())
        c_big, c_r = module_scaling(keep, scaling), module_scaling(rank, scaling)
        root = torch.sqrt(s[:keep] / c_big)
        a_glob = (root[:, None] * vh[:keep]).float()
        b_glob = (u[:, :keep] * root[None, :]).float()
        a_key, b_key = fm.keys(m)
        keep_r = min(rank, keep)
        a = initial_a(a_key, rank, a_glob.shape[1], init_seed)
        b = torch.zeros(b_glob.shape[0], rank)
        factor = math.sqrt(c_big / c_r)
        a[:keep_r], b[:, :keep_r] = a_glob[:keep_r] * factor, b_glob[:, :keep_r] * factor
        out[a_key], out[b_key] = a, b
    return out


def per_example(model: Any, tok: Any, examples: list[Any], max_len: int) -> list[float]:
    """Each example's own response loss (batch 1)."""
    return [evaluate(model, tok, [e], max_len=max_len, batch_size=1).loss for e in examples]


def run_one(
    base: Any,
    tok: Any,
    train: list[Any],
    held: list[Any],
    shape: LoraSpec,
    cfg: TrainConfig,
    start: dict[str, torch.Tensor] | None,
    per_example_losses: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    peft_model = attach_lora(base, shape, init_seed=0)
    batches = _batch_order(len(train), cfg.batch_size, cfg.seed)
    steps = [next(batches) for _ in range(cfg.steps)]  # the examples train_lora will see
    seen = sorted({i for b in steps for i in b})
    extra: dict[str, Any] = {}
    try:
        if start is not None:
            set_adapter_state(peft_model, start)
        before = evaluate(peft_model, tok, held, batch_size=8).loss
        if per_example_losses:  # the examples this run trains on, before and after
            extra["train_before"] = per_example(peft_model, tok, [train[i] for i in seen],
                                                cfg.max_len)  # fmt: skip
        result = train_lora(peft_model, tok, train, cfg)
        after = evaluate(peft_model, tok, held, batch_size=8).loss
        if per_example_losses:
            extra["train_after"] = per_example(peft_model, tok, [train[i] for i in seen],
                                               cfg.max_len)  # fmt: skip
        state = get_adapter_state(peft_model)
    finally:
        peft_model.unload()
    losses = result.losses
    if per_example_losses:
        b, a = extra["train_before"], extra["train_after"]
        worst = max(range(len(losses)), key=lambda k: losses[k])
        extra.update(
            train_mean_before=sum(b) / len(b),
            train_mean_after=sum(a) / len(a),
            worst_step=worst,
            worst_step_start_loss=[b[seen.index(i)] for i in steps[worst]],
            last_step_start_loss=[b[seen.index(i)] for i in steps[-1]],
        )
    row = {
        **extra,
        "first": losses[0],
        "max": max(losses),
        "last4": sum(losses[-4:]) / len(losses[-4:]),
        "eval_before": before,
        "eval_after": after,
        "seconds": round(result.seconds, 1),
        "losses": [round(x, 4) for x in losses],
    }
    return row, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", type=Path, default=Path("/work/sb/results/data/seed-0"))
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--quants", default="fp32,nf4")
    ap.add_argument("--ranks", default="1,8")
    ap.add_argument("--scalings", default=",".join(SCALINGS))
    ap.add_argument("--scenarios", default="fresh,global")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--eval-examples", type=int, default=16)
    ap.add_argument("--round1-lr", type=float, default=None,
                    help="the fast agent's lr in round 1 (default: the measured lr)")  # fmt: skip
    ap.add_argument("--per-example", action="store_true",
                    help="each trained example's loss before and after (slower)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        import tempfile

        from _tiny import tiny_model_dir

        from aggregator.local.demo_data import make_demo_split, write_demo

        model = resolve_model(tiny_model_dir())
        args.steps, args.eval_examples, args.lrs = 3, 4, "1e-3"
        args.data = Path(tempfile.mkdtemp(prefix="edgefed-fedpipe-scaling-"))
        write_demo(args.data, make_demo_split(1, per_agent=16, n_eval=8, n_public=0))
    else:
        model = resolve_model(DEFAULT_MODEL)
    train = load_jsonl(args.data / "agent-0.jsonl")
    held = load_jsonl(args.data / "eval.jsonl")[: args.eval_examples]
    lrs = [float(x) for x in args.lrs.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    scalings = args.scalings.split(",")
    rows: list[dict[str, Any]] = []
    globals_: dict[tuple[float, str], dict[str, torch.Tensor]] = {}
    if "global" in args.scenarios:  # round 1 of a fast agent: fp32, rank 16, 8 steps of 4
        base, tok = load_base(model, "fp32")
        for lr in lrs:
            for scaling in scalings:
                lr1 = args.round1_lr or lr
                cfg = TrainConfig(steps=8 if not args.quick else 2, batch_size=4, lr=lr1, seed=1)
                row, state = run_one(base, tok, train, held, spec(16, scaling), cfg, None)
                globals_[(lr, scaling)] = deltas(state, 16, scaling)
                print(f"round 1 fp32 r16 {scaling} lr={lr:g}: {json.dumps(row)}", flush=True)
        del base
    for quant in args.quants.split(","):
        base, tok = load_base(model, quant)
        for scenario in args.scenarios.split(","):
            for lr in lrs:
                for rank in ranks:
                    for scaling in scalings:
                        start = None
                        if scenario == "global":
                            start = truncated(globals_[(lr, scaling)], rank, scaling, 0)
                        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, seed=2)
                        t0 = time.perf_counter()
                        row, _ = run_one(base, tok, train, held, spec(rank, scaling), cfg, start,
                                         args.per_example)  # fmt: skip
                        row.update(scenario=scenario, quant=quant, lr=lr, rank=rank,
                                   scaling=scaling, scale=module_scaling(rank, scaling))  # fmt: skip
                        rows.append(row)
                        print(
                            f"{scenario:6} {quant:4} lr={lr:<6g} r={rank:<2} {scaling:7} "
                            f"(x{row['scale']:5.2f}): train first {row['first']:.3f} max "
                            f"{row['max']:.3f} last4 {row['last4']:.3f} | eval "
                            f"{row['eval_before']:.3f} -> {row['eval_after']:.3f}  "
                            f"({time.perf_counter() - t0:.0f} s)",
                            flush=True,
                        )
                        if args.per_example:
                            print(
                                f"    own examples' loss {row['train_mean_before']:.3f} -> "
                                f"{row['train_mean_after']:.3f}; worst step {row['worst_step']} "
                                f"(loss {row['max']:.3f}, its example at the start "
                                f"{row['worst_step_start_loss']}); last step loss "
                                f"{row['losses'][-1]:.3f} (at the start "
                                f"{row['last_step_start_loss']})\n    losses {row['losses']}",
                                flush=True,
                            )
        del base
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
