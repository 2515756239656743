"""The parts of ``gpu_check.py``: each returns a :class:`Part` that ran, was skipped (and why)
or failed (and how). A part never raises: one broken part must not hide the others' figures."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec" / "randomness-v1.json"
SPEC_COPY = REPO / "tests" / "protocol" / "data" / "randomness-v1.json"


@dataclass
class Part:
    name: str
    status: str = "ran"  # ran | skipped | failed
    model: str = "-"  # which model its figures come from
    lines: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # halves skipped inside a part that ran
    ok: bool = True  # the part's own check (bit-exact, loss fell, export loaded)


@dataclass
class Ctx:
    device: str  # "cuda:0" or "cpu"
    model_dir: Path
    model_label: str
    tiny_dir: Path
    quick: bool
    work: Path
    env: dict[str, str]
    quants: tuple[str, ...]


def have(module: str) -> bool:
    """Whether ``module`` imports (a wheel whose compiled part does not load counts as missing)."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or whatever a broken extension raises
        return False
    return True


def guarded(name: str, fn: Callable[[Ctx, Part], None], ctx: Ctx, needs: tuple[str, ...]) -> Part:
    part = Part(name)
    missing = [m for m in needs if not have(m)]
    if missing:
        part.status = "skipped"
        part.lines.append(f"skipped: {', '.join(missing)} not importable (see --bundle)")
        return part
    try:
        fn(ctx, part)
    except Exception:  # report and go on: the other parts' figures still count
        part.status = "failed"
        part.ok = False
        part.lines.append(traceback.format_exc().rstrip())
    return part


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _examples() -> list[Any]:
    from aggregator.local.demo_data import make_demo_split
    from edge_agent.training.data import Example

    records = make_demo_split(1, per_agent=64, seed=0).agents[0]
    return [Example(r["instruction"] + "\n\n" + r["input"], r["output"]) for r in records]


# --- 1. model loading per precision: the agent's step beside a plain peft loop -----------------


def load_and_step(ctx: Ctx, part: Part) -> None:
    from peft import LoraConfig, get_peft_model

    from edge_agent.model.loader import base_param_bytes, load_base
    from edge_agent.model.store import resolve_model
    from edge_agent.training.data import tokenize
    from edge_agent.training.lora import LoraSpec, attach_lora
    from edge_agent.training.train import TrainConfig, train_lora

    part.model = ctx.model_label
    if not ctx.device.startswith("cuda"):
        part.skipped.append("torch.cuda.max_memory_allocated: no CUDA device (CPU run)")
    resolved = resolve_model(str(ctx.model_dir))
    examples = _examples()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps = 2 if ctx.quick else 5
    part.lines.append(f"{ctx.device}, LoRA r=8 on q,k,v,o, batch 4 of the demo data, {steps} steps")
    part.lines.append(
        "quant  base MiB  agent s/step  agent peak MiB  plain s/step  plain peak MiB  "
        "same-loss s/step  agent/same-loss"
    )
    for quant in ctx.quants:
        if quant in ("nf4", "int8") and not have("bitsandbytes"):
            part.skipped.append(f"{quant}: bitsandbytes not importable")
            continue
        row: dict[str, Any] = {}
        model, tok = load_base(resolved, quant, device=ctx.device)
        row["base_mib"] = base_param_bytes(model) / 2**20
        peft_model = attach_lora(model, LoraSpec(8, 16.0, 0.0, targets), init_seed=0)
        train_lora(peft_model, tok, examples, TrainConfig(steps=1, batch_size=4, lr=1e-4))
        _reset(ctx.device)
        res = train_lora(peft_model, tok, examples, TrainConfig(steps=steps, batch_size=4, lr=1e-4))
        _sync(ctx.device)
        row["agent_s"], row["agent_peak_mib"] = res.seconds / steps, _peak(ctx.device)
        row["agent_losses"] = res.losses
        del peft_model, model
        model, tok = load_base(resolved, quant, device=ctx.device)
        plain = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
        loop = _PlainLoop(plain, tokenize(examples, tok, 128), tok.pad_token_id, ctx.device)
        loop.run(1, same_loss=False)  # warm-up
        _reset(ctx.device)
        row["plain_s"], row["plain_peak_mib"] = loop.run(steps, False), _peak(ctx.device)
        row["same_loss_s"] = loop.run(steps, same_loss=True)
        del plain, model, loop
        _reset(ctx.device)
        part.figures[quant] = row
        part.lines.append(
            f"{quant:<5}  {row['base_mib']:>8.1f}  {row['agent_s']:>12.4f}  "
            f"{_mib(row['agent_peak_mib']):>14}  {row['plain_s']:>12.4f}  "
            f"{_mib(row['plain_peak_mib']):>14}  {row['same_loss_s']:>16.4f}  "
            f"{row['agent_s'] / row['same_loss_s']:>15.3f}"
        )


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _peak(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None


def _reset(device: str) -> None:
    import torch

    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _PlainLoop:
    """A hand-written AdamW loop on a stock peft model: mean seconds per step over ``n``."""

    def __init__(self, model: Any, data: list[Any], pad_id: int, device: str) -> None:
        import torch

        self.model, self.data, self.pad_id, self.device = model, data, pad_id, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.step = 0

    def run(self, n: int, same_loss: bool) -> float:
        import torch

        from edge_agent.training._forward import forward_ce
        from edge_agent.training.data import collate

        self.model.train()
        total_s = 0.0
        for _ in range(n):
            batch = [self.data[(self.step * 4 + j) % len(self.data)] for j in range(4)]
            self.step += 1
            ids, mask, labels = collate(batch, self.pad_id, torch.device(self.device), left=False)
            _sync(self.device)
            start = time.perf_counter()
            self.opt.zero_grad()
            if same_loss:  # the agent's loss: LM head only where a response token is predicted
                loss_sum, count = forward_ce(self.model, ids, mask, labels, True)
                loss = loss_sum / count.clamp(min=1)
            else:  # the stock loss: logits at every position
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            self.opt.step()
            _sync(self.device)
            total_s += time.perf_counter() - start
        return total_s / n


# --- 2. the agent's profile against nvidia-smi --------------------------------------------------


def profile_vs_smi(ctx: Ctx, part: Part) -> None:
    part.model = "none"
    cmd = [sys.executable, "-m", "edge_agent", "profile", "--disk", str(ctx.work)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=ctx.env, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"edgefed-agent profile failed: {proc.stderr[-2000:]}")
    prof = json.loads(proc.stdout)
    part.figures["profile"] = prof
    part.lines.append(
        f"edgefed-agent profile: matmul fp32 {prof['matmul_gflops_fp32']:.1f} GFLOP/s, "
        f"bf16 {prof['matmul_gflops_bf16']:.1f} GFLOP/s, {len(prof['gpus'])} GPU(s)"
    )
    smi = shutil.which("nvidia-smi")
    if smi is None or not prof["gpus"]:
        part.skipped.append("GPU memory against nvidia-smi: no nvidia-smi or no CUDA device")
        return
    query = "--query-gpu=index,name,memory.total,memory.free,memory.used"
    out = subprocess.run([smi, query, "--format=csv,noheader,nounits"], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    for gpu in prof["gpus"]:
        smi_row = next((r for r in rows if int(r[0]) == gpu["index"]), None)
        if smi_row is None:
            continue
        total_mib, free_mib = float(smi_row[2]), float(smi_row[3])
        agent_total, agent_free = gpu["memory_total"] / 2**20, gpu["memory_free"] / 2**20
        part.figures.setdefault("gpus", []).append(
            {"name": gpu["name"], "agent_total_mib": agent_total, "agent_free_mib": agent_free,
             "smi_total_mib": total_mib, "smi_free_mib": free_mib}
        )  # fmt: skip
        part.lines.append(
            f"GPU {gpu['index']} {gpu['name']}: total agent {agent_total:,.0f} MiB vs nvidia-smi "
            f"{total_mib:,.0f} MiB; free agent {agent_free:,.0f} MiB vs nvidia-smi "
            f"{free_mib:,.0f} MiB (the profile ran in its own process, now exited)"
        )


# --- 3. the shared-randomness reference vectors, regenerated on the device --------------------


def randomness_vectors(ctx: Ctx, part: Part) -> None:
    import torch

    from protocol import randomness as R

    part.model = "none"
    path = SPEC if SPEC.exists() else SPEC_COPY
    spec = json.loads(path.read_text(encoding="utf-8"))
    devices = ["cpu"] + (["cuda"] if ctx.device.startswith("cuda") else [])
    if len(devices) == 1:
        part.skipped.append("the CUDA half: no CUDA device (CPU regenerated only)")
    for dev in devices:
        checked = mismatched = 0
        for case in spec["cases"]:
            key = case["key"]
            got = {
                "words": [
                    v & (2**64 - 1) for v in R.words_torch(key, 4, device=dev).cpu().tolist()
                ],
                "uniform": R.uniform_torch(key, len(case["uniform"]), device=dev).cpu().tolist(),
                "rademacher_first_130": R.rademacher_torch(key, 130, device=dev).cpu().tolist(),
                "mask_n4096_density_0.01": R.mask_indices_torch(key, 4096, 0.01, device=dev)
                .cpu()
                .tolist(),
            }
            for name, values in got.items():
                checked += 1
                mismatched += values != case[name]
        part.figures[dev] = {"vectors": checked, "mismatched": mismatched}
        part.ok &= mismatched == 0
        part.lines.append(
            f"{dev}: {checked} reference vectors of {path.name} regenerated, {mismatched} differ"
        )
    part.figures["torch"] = torch.__version__


# --- 4. Ferret's reconstruction, a CPU agent against a GPU agent ------------------------------


def ferret_cpu_vs_gpu(ctx: Ctx, part: Part) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from protocol.methods.ferret import math as fm

    part.model = f"tiny random Llama ({ctx.tiny_dir.name})"
    model = AutoModelForCausalLM.from_pretrained(ctx.tiny_dir, dtype=torch.float32)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    layout = fm.build_layout({k: tuple(v.shape) for k, v in state.items()})
    gen = torch.Generator().manual_seed(0)
    n_groups = len(layout.groups)
    groups = torch.arange(n_groups).repeat_interleave(4)
    seeds = torch.randint(0, 32, (groups.numel(),), generator=gen)
    values = torch.randn(groups.numel(), generator=gen) * 1e-3
    pairs = {(int(g), int(s)) for g, s in zip(groups, seeds, strict=True)}
    keep = sorted(pairs)
    group_t = torch.tensor([g for g, _ in keep])
    seed_t = torch.tensor([s for _, s in keep])
    value_t = values[: len(keep)]
    results = {}
    devices = ["cpu"] + (["cuda:0"] if ctx.device.startswith("cuda") else [])
    if len(devices) == 1:
        part.skipped.append("the GPU agent: no CUDA device (the CPU agent ran alone)")
    for dev in devices:
        params = {k: v.clone().to(dev) for k, v in state.items()}
        start = time.perf_counter()
        stats = fm.apply_step(params, layout, 1234, group_t, seed_t, value_t,
                              server_lr=1.0, clip_norm=1e6, measure=True)  # fmt: skip
        _sync(dev)
        results[dev] = {k: v.cpu() for k, v in params.items()}
        part.lines.append(
            f"{dev}: {stats.terms} (group, seed) terms over {n_groups} groups applied in "
            f"{time.perf_counter() - start:.3f} s, step norm {stats.sq_norm**0.5:.6f}"
        )
    changed = sum(not torch.equal(results["cpu"][k], state[k]) for k in state)
    part.figures["tensors_changed"] = changed
    part.ok &= changed > 0
    if len(results) == 2:
        differ = [k for k in state if not torch.equal(results["cpu"][k], results["cuda:0"][k])]
        part.figures["tensors_differing_cpu_gpu"] = len(differ)
        part.ok &= not differ
        part.lines.append(
            f"CPU agent vs GPU agent: {len(state) - len(differ)} of {len(state)} tensors equal "
            f"bit for bit ({changed} changed by the step)"
        )
