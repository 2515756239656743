"""Time per local step inside the agent against a plain peft training loop, same base and batch.

Run: ``python benchmarks/step_overhead.py [--quick] [--quant nf4]``. Both loops train the same
LoRA (r=8 on q,k,v,o) on the embedded default model with the same batches (4 examples of the
demo data, padded to the batch's longest), alternating, in one process:

- *agent*: ``edge_agent.methods.fedit.client.FeditClient.run`` — what a TaskAssign costs end to end
  (global adapter loaded from the wire payload, training, update encoded into a payload);
- *plain*: a hand-written ``AdamW`` loop over ``model(**batch).loss`` on a stock peft model.

It prints the median seconds per step of each and their ratio (target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 steps per loop, 1 repeat, a tiny model (CI)"
    )
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="Alias, HF directory or .gguf.")
    args = parser.parse_args()
    if args.quick and args.model == "smollm2-135m":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tiny import tiny_model_dir

        args.model = tiny_model_dir()
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)

    import torch
    from peft import LoraConfig, get_peft_model

    from aggregator.local.demo_data import make_demo_split
    from edge_agent.methods import TaskInput
    from edge_agent.methods.fedit.client import FeditClient
    from edge_agent.model.store import load_base, resolve_model
    from edge_agent.training.data import Example, collate, tokenize
    from protocol.messages import BaseModelRef, TaskAssign
    from protocol.methods import parse_params

    torch.set_num_threads(2)
    resolved = resolve_model(args.model)
    records = make_demo_split(1, per_agent=64, seed=0).agents[0]
    examples = [
        Example(prompt=r["instruction"] + "\n\n" + r["input"], response=r["output"])
        for r in records
    ]

    class Workspace:
        def __init__(self) -> None:
            self.cache: dict[str, Any] = {}
            self.loaded = load_base(resolved, args.quant)  # type: ignore[arg-type]

        train_examples = examples
        eval_examples = examples
        progress = False

        def base(self, model: Any, quant: str) -> Any:
            return self.loaded

        def should_stop(self) -> bool:
            return False

        def report_progress(self, fraction: float) -> None:
            pass

    ws = Workspace()
    params = parse_params("fedit", {"train": {"steps": steps, "batch_size": 4, "lr": 1e-4}})
    client = FeditClient()

    def agent_round(rnd: int) -> float:
        assign = TaskAssign(run_id="bench", round=rnd, task_id=f"t{rnd}", method="fedit",
                            model=BaseModelRef(name="m", sha256=resolved.sha256),
                            params=params.model_dump(mode="json"))  # fmt: skip
        start = time.perf_counter()
        client.run(TaskInput(assign=assign, params=params, blobs={}), ws)  # type: ignore[arg-type]
        return (time.perf_counter() - start) / steps

    plain_base, tokenizer = load_base(resolved, args.quant)  # type: ignore[arg-type]
    plain = get_peft_model(
        plain_base,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )  # type: ignore[arg-type]
    data = tokenize(examples, tokenizer, 128)
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_round(rnd: int) -> float:
        plain.train()
        start = time.perf_counter()
        for step in range(steps):
            batch = [data[(rnd * steps + step) * 4 % len(data) + j] for j in range(4)]
            ids, mask, labels = collate(
                batch, tokenizer.pad_token_id, torch.device("cpu"), left=False
            )
            optimizer.zero_grad()
            loss = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    agent_round(0)  # warm-up both (first-call allocations, bnb kernels)
    plain_round(0)
    agent_t, plain_t = [], []
    for rnd in range(1, repeats + 1):
        agent_t.append(agent_round(rnd))
        plain_t.append(plain_round(rnd))
    a, p = statistics.median(agent_t), statistics.median(plain_t)
    print(f"base {args.quant}, batch 4 x <=128 tokens, {steps} steps x {repeats} repeats")
    print(f"agent (FeditClient.run)   {a:.3f} s/step")
    print(f"plain peft loop           {p:.3f} s/step")
    print(f"ratio agent / plain       {a / p:.3f}  (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
