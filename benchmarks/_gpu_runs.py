"""The parts of ``gpu_check.py`` that plan and run federations: FedPipe's plan for a GPU agent
beside a CPU agent, and ``edgefed-aggregator local`` with 2 agents (fedit, Ferret)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

from _gpu_parts import Ctx, Part, have


def fedpipe_plan(ctx: Ctx, part: Part) -> None:
    import psutil
    import torch

    from aggregator.methods.fedpipe import plan as fp
    from aggregator.methods.fedpipe import solve as fs
    from edge_agent.daemon.profile import collect_profile, matmul_gflops

    part.model = f"{ctx.model_label} (shape only: the plan reads config and weight shapes)"
    shape, linears = fp.model_shape(ctx.model_dir)
    profile = collect_profile(disk_path=ctx.work)
    agents: dict[str, fp.Resources] = {
        "cpu-agent": fp.Resources(
            gflops_fp32=matmul_gflops(torch.float32, "cpu"),
            gflops_bf16=matmul_gflops(torch.bfloat16, "cpu"),
            memory_bytes=float(psutil.virtual_memory().available),
            bandwidth_mbps=100.0,
            rtt_ms=1.0,
            tokens_mean=64.0,
        )
    }
    gpus: list[dict[str, Any]] = profile["gpus"]
    if gpus:
        agents["gpu-agent"] = fp.Resources(
            gflops_fp32=float(profile["matmul_gflops_fp32"]),
            gflops_bf16=float(profile["matmul_gflops_bf16"]),
            memory_bytes=float(max(g["memory_free"] for g in gpus)),
            bandwidth_mbps=100.0,
            rtt_ms=1.0,
            gpu=True,
            tokens_mean=64.0,
        )
    else:
        part.skipped.append("the GPU agent: no CUDA device (the CPU agent is planned alone)")
    # No importance scores exist before training: the 7 projections of every layer in name
    # order, halved (FedPipe selects the most important half), split into 2 rank tiers.
    modules = [fp.Module(name.removesuffix(".weight"), i, o) for name, (o, i) in linears.items()]
    modules = sorted(modules, key=lambda m: fp.natural(m.name))[: max(2, len(modules) // 2)]
    options = fp.Options(ranks=(2, 4, 8, 16), batch_sizes=(1, 2, 4, 8),
                         quants=("bf16", "int8", "nf4"), examples_per_round=48, max_len=128,
                         capacity_floor=0.5 * len(agents) * len(modules) * 8)  # fmt: skip
    problem = fp.Problem(fp.split_tiers(modules, 2), shape, agents, options)
    if have("scipy"):
        solution = fs.solve_milp(problem)
    else:
        part.skipped.append("scipy not importable: solved exhaustively (the same optimum)")
        solution = fs.solve_exhaustive(problem)
    part.lines.append(
        f"{len(modules)} modules in 2 tiers; solver {solution.solver}; "
        f"shape body {shape.body_params:,} other {shape.other_params:,} params"
    )
    for name, plan in fp.agent_plans(problem, solution).items():
        res = agents[name]
        part.figures[name] = {"resources": res.__dict__, "plan": plan.__dict__}
        part.lines.append(
            f"{name}: {res.gflops_fp32:,.1f}/{res.gflops_bf16:,.1f} GFLOP/s fp32/bf16, "
            f"{res.memory_bytes / 2**30:,.1f} GiB -> {plan.quant}, batch {plan.batch}, "
            f"ranks {plan.tier_ranks}, {plan.steps} steps, est. {plan.seconds:.2f} s, "
            f"{plan.memory_bytes / 2**20:,.0f} MiB, {plan.payload_bytes:,} B"
        )
    part.figures["constants"] = {
        "KAPPA": dict(fp.KAPPA), "OVERHEAD_GFLOP": dict(fp.OVERHEAD_GFLOP),
        "ACT_TOKEN": dict(fp.ACT_TOKEN), "ACT_PEAK": fp.ACT_PEAK,
        "RUNTIME_BYTES": fp.RUNTIME_BYTES, "BYTES_LINEAR": dict(fp.BYTES_LINEAR),
        "PAYLOAD_HEADER": fp.PAYLOAD_HEADER,
    }  # fmt: skip
    part.lines.append(
        "constants (CPU-measured, used for CUDA agents too): "
        + json.dumps(part.figures["constants"], separators=(",", ":"))
    )


def local_runs(ctx: Ctx, part: Part) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    part.model = ctx.model_label
    rounds = 2 if ctx.quick else 3
    steps = 2 if ctx.quick else 6
    for method in ("fedit", "ferret"):
        work = ctx.work / f"local-{method}"
        cmd = [sys.executable, "-m", "aggregator", "local", "--method", method,
               "--agents", "2", "--rounds", str(rounds), "--steps", str(steps),
               "--per-agent", "16", "--eval-examples", "8", "--batch-size", "4",
               "--model", str(ctx.model_dir), "--workdir", str(work)]  # fmt: skip
        if method == "fedit":
            cmd += ["--quant", "nf4" if have("bitsandbytes") else "bf16"]
        else:
            cmd += ["--lr", "0.05"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ctx.env, timeout=1800,
                              check=False)  # fmt: skip
        if proc.returncode != 0:
            part.ok = False
            part.lines.append(f"{method}: exit {proc.returncode}\n{proc.stdout[-1500:]}"
                              f"\n{proc.stderr[-3000:]}")  # fmt: skip
            continue
        result = json.loads((work / "result.json").read_text(encoding="utf-8"))
        rows = {int(r["round"]): r for r in result["rows"]}
        first, last = rows[0]["eval_loss"], rows[max(rows)]["eval_loss"]
        fell = math.isfinite(last) and last < first
        loaded = _export_loads(result, ctx, AutoModelForCausalLM, PeftModel)
        part.ok &= fell and loaded.startswith("loaded")
        part.figures[method] = {"rows": result["rows"], "export": loaded}
        part.lines.append(f"{method} ({' '.join(cmd[3:])}):")
        part.lines += ["    " + line for line in proc.stdout.strip().splitlines()[-(rounds + 4) :]]
        part.lines.append(
            f"    eval loss {first:.4f} -> {last:.4f} ({'fell' if fell else 'DID NOT FALL'}); "
            f"export: {loaded}"
        )
    agents_on = "cuda:0" if ctx.device.startswith("cuda") else "cpu"
    part.lines.append(f"agents trained on {agents_on} (the agent picks CUDA when it is present)")


def _export_loads(result: dict[str, Any], ctx: Ctx, auto: Any, peft_model: Any) -> str:
    """Load what the run exported: a PEFT adapter on the base (fedit), a whole model (Ferret)."""
    try:
        if "model" in result:
            model = auto.from_pretrained(result["model"])
        else:
            model = peft_model.from_pretrained(
                auto.from_pretrained(ctx.model_dir), result["adapter"]
            )
        n = sum(p.numel() for p in model.parameters())
        return f"loaded ({n:,} parameters)" if n else "empty model"
    except Exception as exc:  # report it: the check says what failed
        return f"did not load: {exc!r}"[:500]
