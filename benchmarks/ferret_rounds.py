"""Ferret over a few rounds, in one process: server-lr schedules side by side.

Each configuration runs R rounds of the real halves: a :class:`FerretServer` and
:class:`FerretClient` agents (one shared workspace: every agent holds the same global model,
and a train task puts the weights back after projecting), on the demo split, and prints the
held-out loss of the global model after each round (an eval task of the client, exact match
off). Same data, seeds and local steps for every configuration.

    python benchmarks/ferret_rounds.py [--quick] [--rounds 3] [--agents 2] [--steps 4]
        [--lr 0.05] [--k 32] [--configs none:1,linear:3.333,...]

A configuration is ``anneal:server_lr``. (Until 2026-12-04 it was ``pool:anneal:server_lr``:
the per-round seed pool was an option then; docs/methods/ferret.md has the runs.)
``--quick``: the tiny random Llama, 2 rounds, two configurations.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer
from benchmarks._ferret_probe import demo_data
from edge_agent.methods import TaskInput, TaskOutput
from edge_agent.methods.ferret.client import FerretClient
from edge_agent.model.store import DEFAULT_MODEL, ResolvedModel, load_base, resolve_model
from edge_agent.training.data import Example
from protocol.messages import BaseModelRef, TaskAssign, TaskResult
from protocol.methods import parse_params


class Workspace:
    """The client's Workspace over one resolved model; the examples are swapped per agent."""

    def __init__(self, resolved: ResolvedModel, eval_examples: list[Example]) -> None:
        self.resolved = resolved
        self.cache: dict[str, Any] = {}
        self.train_examples: list[Example] = []
        self.eval_examples = eval_examples
        self.progress = False
        self._base: tuple[Any, Any] | None = None

    def base(self, model: BaseModelRef, quant: str) -> tuple[Any, Any]:
        if self._base is None:
            self._base = load_base(self.resolved, "fp32", device="cpu")
        return self._base

    def should_stop(self) -> bool:
        return False

    def report_progress(self, fraction: float) -> None:
        pass


def run_task(ws: Workspace, agent: str, kind: str, round: int, a: Any) -> TaskOutput:
    assign = TaskAssign(
        run_id="rounds", round=round, task_id=f"r{round}-{kind}-{agent}", kind=kind,  # type: ignore[arg-type]
        method="ferret", model=BaseModelRef(name="m", sha256=ws.resolved.sha256), quant="fp32",
        params=a.params, deadline_s=3600.0,
    )  # fmt: skip
    blobs = {k: memoryview(v) for k, v in a.blobs.items()}
    task = TaskInput(assign, parse_params("ferret", a.params), blobs, agent_id=agent)
    return FerretClient().run(task, ws)  # type: ignore[arg-type]


def one_config(
    ws: Workspace,
    model_dir: Path,
    data: dict[str, list[Example]],
    params: dict[str, Any],
    rounds: int,
) -> list[float]:
    """Eval loss of the global model at rounds 0..R."""
    ws.cache.clear()
    server = FerretServer(params, MethodContext(model_dir=model_dir, rounds=rounds))
    losses = [
        run_task(ws, "eval", "eval", 0, server.assign(0, "eval", "eval")).metrics["eval_loss"]
    ]
    for r in range(1, rounds + 1):
        server.begin_round(r)
        for agent, examples in data.items():
            ws.train_examples = examples
            out = run_task(ws, agent, "train", r, server.assign(r, agent, "train"))
            result = TaskResult(
                run_id="rounds", round=r, task_id=f"r{r}-{agent}", agent_id=agent,
                method="ferret", num_examples=out.num_examples, metrics=out.metrics,
            )  # fmt: skip
            blobs = {k: memoryview(v) for k, v in out.blobs.items()}
            server.add(server.validate(r, result, blobs))
        server.finish_round(r)
        losses.append(
            run_task(ws, "eval", "eval", r, server.assign(r, "eval", "eval")).metrics["eval_loss"]
        )
    server.wait_weights()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="none:1,linear:3.333")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        from benchmarks._tiny import tiny_model

        model_dir = tiny_model(Path(tempfile.mkdtemp(prefix="ferret-rounds-")) / "model")
        resolved = resolve_model(str(model_dir))
        args.rounds, args.steps = 2, 2
        args.configs = "none:1,linear:3.333"
    else:
        resolved = resolve_model(DEFAULT_MODEL)
        model_dir = Path(resolved.path)
    data, eval_examples = demo_data(args.agents, 16 if args.quick else 64, 8 if args.quick else 48)
    ws = Workspace(resolved, eval_examples)
    print(
        f"ferret rounds: {resolved.name}, {args.agents} agents x {args.steps} SGD steps "
        f"(lr {args.lr}, batch 4), K = {args.k}, eval loss on {len(eval_examples)} held-out examples"
    )
    print(f"{'anneal':>7} {'server lr':>9}  eval loss per round 0..{args.rounds}")
    for config in args.configs.split(","):
        anneal, lr = config.split(":")
        params = {
            "train": {"steps": args.steps, "batch_size": 4, "lr": args.lr, "max_len": 128},
            "eval": {"exact_match": False, "max_examples": len(eval_examples)},
            "ferret": {"k": args.k, "anneal": anneal, "server_lr": float(lr)},
        }
        started = time.perf_counter()
        losses = one_config(ws, model_dir, data, params, args.rounds)
        row = " ".join(f"{x:.4f}" for x in losses)
        print(
            f"{anneal:>7} {float(lr):>9.3f}  {row}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
