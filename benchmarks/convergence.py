"""Convergence per byte: every method on the demo task's non-IID split, beside two references.

Run: ``python benchmarks/convergence.py [--methods fedit,slora,ferret,fedbiot,fedpipe]
[--rounds 3] [--quick]``. Each method runs the real system (``edgefed-aggregator local``: an
aggregator and agent processes on loopback, the embedded SmolLM2-135M, NF4 base) on the same
split, seed and local steps; its round table gives the eval loss and exact match per round
(the example-weighted mean over agents' shards of one shared eval set) and the bytes each agent
sent and received. Two references, trained in this process on the same base, data and eval set:

- *centralised*: one LoRA (fedit's: r=8 on q,k,v,o) on the pooled training data of every
  agent, ``agents x steps`` steps per round (the same number of examples seen per round as the
  federation) — the upper reference; nothing travels.
- *local only*: each agent trains its own LoRA on its own data only, ``steps`` per round, never
  shares; the mean of the agents' eval figures — the lower reference.

It prints a table (round, eval loss, EM, cumulative MB on the wire for all agents) and writes
a plot of eval loss against round and against cumulative bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_method(method: str, args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    import io

    from aggregator.local.options import LocalOptions
    from aggregator.local.run import run_local

    opts = LocalOptions(
        method=method, agents=args.agents, rounds=args.rounds, workdir=work / method,
        model=args.model, alpha=args.alpha, per_agent=args.per_agent, steps=args.steps,
        batch_size=args.batch_size, lr=args.ferret_lr if method == "ferret" else args.lr,
        rank=8, quant="nf4", insecure=True, merge=False, seed=args.seed,
        eval_examples=args.eval_examples,
    )  # fmt: skip
    table = io.StringIO()
    result = run_local(opts, out=table)
    print(table.getvalue(), flush=True)
    rows: list[dict[str, float]] = result["rows"]
    # everything on the wire: the training phase and the evaluation phase (which carries what
    # some methods need next: Ferret's step, FedBiOT's emulator bundle with the round-0 eval)
    total = 0.0
    for row in rows:
        agents = row.get("agents") or args.agents
        if row["round"] > 0:
            total += (row["bytes_up_per_agent"] + row["bytes_down_per_agent"]) * agents
        total += (
            row.get("eval_bytes_up_per_agent", 0.0) + row.get("eval_bytes_down_per_agent", 0.0)
        ) * args.agents
        row["cum_bytes"] = total
    return rows


def references(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Centralised (pooled data) and local-only LoRA on the same base, data and eval set."""
    import torch

    from aggregator.local.demo_data import make_demo_split, write_demo
    from edge_agent.model.store import load_base, resolve_model
    from edge_agent.training.data import load_jsonl
    from edge_agent.training.lora import LoraSpec, attach_lora
    from edge_agent.training.train import TrainConfig, evaluate, train_lora

    torch.set_num_threads(2)
    split = make_demo_split(args.agents, per_agent=args.per_agent, alpha=args.alpha,
                            seed=args.seed, n_eval=args.eval_examples)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(Path(tmp), split)
        agents = [load_jsonl(files[f"agent-{i}"]) for i in range(args.agents)]
        evalset = load_jsonl(files["eval"])
    resolved = resolve_model(args.model)
    spec = LoraSpec(
        r=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )

    def score(model: Any, tok: Any) -> tuple[float, float]:
        r = evaluate(model, tok, evalset, max_len=128, batch_size=8, exact_match=True,
                     max_new_tokens=12)  # fmt: skip
        return r.loss, float(r.exact_match or 0.0)

    def trajectory(data: list[Any], steps: int, seed: int) -> list[tuple[float, float]]:
        base, tok = load_base(resolved, "nf4")  # type: ignore[arg-type]
        model = attach_lora(base, spec, init_seed=seed)
        out = [score(model, tok)]
        for rnd in range(1, args.rounds + 1):
            cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=seed + rnd)
            train_lora(model, tok, data, cfg)
            out.append(score(model, tok))
        return out

    pooled = [e for a in agents for e in a]
    central = trajectory(pooled, args.steps * args.agents, args.seed)
    local = [trajectory(a, args.steps, args.seed + 17 * (i + 1)) for i, a in enumerate(agents)]
    rows: dict[str, list[dict[str, float]]] = {"centralised": [], "local only": []}
    for rnd in range(args.rounds + 1):
        rows["centralised"].append({"round": rnd, "eval_loss": central[rnd][0],
                                    "eval_em": central[rnd][1], "cum_bytes": 0.0})  # fmt: skip
        rows["local only"].append({
            "round": rnd,
            "eval_loss": sum(t[rnd][0] for t in local) / len(local),
            "eval_em": sum(t[rnd][1] for t in local) / len(local),
            "cum_bytes": 0.0,
        })  # fmt: skip
    return rows


def plot(results: dict[str, list[dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        rounds = [r["round"] for r in rows if "eval_loss" in r]
        loss = [r["eval_loss"] for r in rows if "eval_loss" in r]
        style = "--" if name in ("centralised", "local only") else "-"
        by_round.plot(rounds, loss, style, marker="o", label=name)
        if name not in ("centralised", "local only"):
            mb = [r["cum_bytes"] / 1e6 for r in rows if "eval_loss" in r and r["round"] > 0]
            by_bytes.plot(mb, loss[1:], marker="o", label=name)
    by_round.set(xlabel="round", ylabel="eval loss (held-out demo set)", title="per round")
    by_bytes.set(xlabel="cumulative MB on the wire, all agents", ylabel="eval loss",
                 title="per byte", xscale="log")  # fmt: skip
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="fedit,slora,ferret,fedbiot,fedpipe")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--per-agent", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=48)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration.")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ferret-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "convergence.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", default="smollm2-135m", help="Alias, HF directory or .gguf.")
    ap.add_argument(
        "--quick", action="store_true", help="fedit only, 1 round, 1 step, a tiny model (CI)."
    )
    args = ap.parse_args()
    if args.quick:
        args.methods, args.rounds, args.steps, args.per_agent = "fedit", 1, 1, 8
        args.eval_examples, args.batch_size = 4, 2
        scratch = Path(tempfile.mkdtemp(prefix="edgefed-conv-quick-"))
        args.out = scratch / "convergence.png"
        from _tiny import tiny_model

        args.model = str(tiny_model(scratch / "tiny"))
    started = time.monotonic()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefed-conv-") as tmp:
        for method in args.methods.split(","):
            results[method] = run_method(method, args, Path(tmp))
    results.update(references(args))
    print(f"{'run':<12} {'round':>5} {'eval loss':>9} {'eval EM':>7} {'cum MB (all agents)':>20}")
    for name, rows in results.items():
        for r in rows:
            loss = r.get("eval_loss")
            em = r.get("eval_em")
            print(f"{name:<12} {int(r['round']):>5} {'-' if loss is None else f'{loss:.4f}':>9} "
                  f"{'-' if em is None else f'{em:.3f}':>7} {r['cum_bytes'] / 1e6:>20.2f}")  # fmt: skip
    plot(results, args.out)
    print(f"plot: {args.out}  ({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
