"""Agent memory per base precision: resident base-weight bytes and peak RSS, side by side.

Run: ``python benchmarks/agent_memory.py [--quick]``. Each precision loads the embedded default
model (SmolLM2-135M-Instruct) in a fresh process, attaches the LoRA adapter the demo uses, runs
one training step, and reports the bytes held by the base weights (quantization constants
included, LoRA excluded) and the process's peak RSS. Ratios are against fp32 in the same run.
``--quick`` measures fp32 and nf4 only, on a tiny random model (so CI can run it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(quant: str, model_spec: str) -> dict[str, float]:
    import torch

    from edge_agent.model.store import base_param_bytes, load_base, resolve_model
    from edge_agent.training.data import Example
    from edge_agent.training.lora import LoraSpec, attach_lora
    from edge_agent.training.train import TrainConfig, train_lora

    torch.set_num_threads(2)
    model, tokenizer = load_base(resolve_model(model_spec), quant)  # type: ignore[arg-type]
    base_bytes = base_param_bytes(model)
    spec = LoraSpec(
        r=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    peft_model = attach_lora(model, spec, init_seed=0)
    examples = [Example(prompt=f"Add {i} and {i + 1}.", response=str(2 * i + 1)) for i in range(8)]
    train_lora(peft_model, tokenizer, examples, TrainConfig(steps=1, batch_size=4, lr=1e-4))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"base_bytes": float(base_bytes), "peak_rss": float(peak_kib * 1024)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="Alias, HF directory or .gguf.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model)))
        return 0
    quants = ["fp32", "nf4"] if args.quick else ["fp32", "bf16", "int8", "nf4"]
    if args.quick and args.model == "smollm2-135m":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tiny import tiny_model_dir

        args.model = tiny_model_dir()
    results: dict[str, dict[str, float]] = {}
    for quant in quants:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", quant, "--model", args.model],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results[quant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["fp32"]
    print(f"{'base':<6} {'base weights MiB':>17} {'x fp32':>7} {'peak RSS MiB':>13} {'x fp32':>7}")
    for quant, r in results.items():
        print(
            f"{quant:<6} {r['base_bytes'] / 2**20:>17.1f} {r['base_bytes'] / ref['base_bytes']:>7.3f} "
            f"{r['peak_rss'] / 2**20:>13.1f} {r['peak_rss'] / ref['peak_rss']:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
