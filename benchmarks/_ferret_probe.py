"""One Ferret round, probed: what the agents' true updates would do against what Ferret applies.

Agents take their SGD steps once from the same global model (``sgd_steps``, the client's own
loop and seeds). Then, on the held-out loss:

- ``true``: the global model plus the example-weighted mean of the agents' true updates Δ̄
  (what full-parameter FedAvg would apply);
- per K: each agent's update projected as the client projects it (``project_update``, its seed
  choice), sent as a ``seedcoef`` payload to a real :class:`FerretServer`, averaged and rebuilt
  there (``validate``, ``add``, ``finish_round``): the step Ferret applies, with its cosine and
  norm ratio against Δ̄.

``loss drop = loss(before) - loss(after)``, so positive is better.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer
from edge_agent.methods.ferret.client import (
    choice_rng,
    model_tensors,
    project_update,
    sgd_seed,
    sgd_steps,
)
from edge_agent.training.data import Example, load_jsonl
from edge_agent.training.evaluate import evaluate
from protocol import payloads
from protocol.messages import TaskResult
from protocol.methods import parse_params
from protocol.methods.ferret import math as fm
from protocol.methods.ferret import spec


@dataclass(frozen=True)
class ProbeRow:
    label: str
    """``before``, ``true`` or ``K=<k>``."""
    loss: float
    drop: float
    cosine: float
    norm_ratio: float
    triples: int


def eval_loss(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], max_len: int = 128
) -> float:
    return evaluate(model, tokenizer, examples, max_len=max_len, batch_size=8).loss


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``<a, b>`` over every tensor, accumulated in float64 (a float32 sum over 1e8 elements
    is off by percents)."""
    return sum(float(torch.dot(a[n].double().reshape(-1), b[n].double().reshape(-1))) for n in a)


def probe(
    model_dir: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    data: Mapping[str, Sequence[Example]],
    eval_examples: Sequence[Example],
    ks: Sequence[int],
    params: Mapping[str, Any],
    on_row: Callable[[ProbeRow], None] = lambda _row: None,
) -> list[ProbeRow]:
    """The rows ``before``, ``true`` and one per K (``model`` is fp32 and left as it was);
    ``on_row`` sees each row as soon as it is measured."""
    tensors = model_tensors(model)
    names = list(tensors)
    base = {n: t.detach().clone() for n, t in tensors.items()}
    parsed = parse_params(spec.NAME, dict(params))
    assert isinstance(parsed, spec.Params)
    model.requires_grad_(True)
    updates: dict[str, dict[str, torch.Tensor]] = {}
    for agent, examples in data.items():
        sgd_steps(model, tokenizer, examples, parsed.train, sgd_seed(parsed, 1, agent))
        with torch.no_grad():
            updates[agent] = {n: tensors[n] - base[n] for n in names}
            for n in names:
                tensors[n].copy_(base[n])
    model.requires_grad_(False)
    max_len = int(params.get("train", {}).get("max_len", 128))
    total = sum(len(data[a]) for a in data)
    mean = {n: torch.zeros_like(base[n]) for n in names}
    for a in data:
        for n in names:
            mean[n] += updates[a][n] * (len(data[a]) / total)
    mean_norm = math.sqrt(_dot(mean, mean))
    before = eval_loss(model, tokenizer, eval_examples, max_len)
    rows = [ProbeRow("before", before, 0.0, 1.0, 1.0, 0)]
    on_row(rows[0])

    def measure(label: str, step: Mapping[str, torch.Tensor], triples: int) -> None:
        with torch.no_grad():
            for n in names:
                tensors[n].copy_(base[n] + step[n])
            loss = eval_loss(model, tokenizer, eval_examples, max_len)
            for n in names:
                tensors[n].copy_(base[n])
        norm = math.sqrt(_dot(step, step))
        cosine = _dot(step, mean) / (norm * mean_norm + 1e-30)
        ratio = norm / (mean_norm + 1e-30)
        rows.append(ProbeRow(label, loss, before - loss, cosine, ratio, triples))
        on_row(rows[-1])

    measure("true", mean, 0)
    for k in ks:
        server = FerretServer(
            {**params, "ferret": {**params.get("ferret", {}), "k": k}},
            MethodContext(model_dir=model_dir),
        )
        p = server.p
        base_seed = fm.pool_base_seed(p.seed)
        server.begin_round(1)
        for agent in data:
            now = {n: base[n] + updates[agent][n] for n in names}
            proj = project_update(
                server.layout, now, base, k=k, base_seed=base_seed, rng=choice_rng(p, 1, agent)
            )
            blob = payloads.encode_seedcoef(
                proj.group, proj.seed, proj.value, base_seed=base_seed, k=k,
                n_groups=len(server.layout.groups), method=spec.NAME, round=1,
            )  # fmt: skip
            result = TaskResult(
                run_id="probe", round=1, task_id=f"probe-{agent}", agent_id=agent,
                method=spec.NAME, num_examples=len(data[agent]), metrics={},
            )  # fmt: skip
            server.add(server.validate(1, result, {spec.UPDATE_BLOB: memoryview(blob)}))
        metrics = server.finish_round(1)
        server.wait_weights()
        step = {n: server.weights[n].float() - base[n] for n in names}
        measure(f"K={k}", step, int(metrics["triples"]))
        del server, step
    return rows


def demo_data(
    agents: int, per_agent: int, n_eval: int
) -> tuple[dict[str, list[Example]], list[Example]]:
    """The demo split (``aggregator.local.demo_data``) as examples: per agent, and the eval set."""
    from aggregator.local.demo_data import make_demo_split, write_demo

    split = make_demo_split(agents, per_agent=per_agent, n_eval=n_eval, seed=0)
    with tempfile.TemporaryDirectory(prefix="ferret-probe-") as tmp:
        files = write_demo(Path(tmp), split)
        data = {f"agent-{i + 1}": load_jsonl(files[f"agent-{i}"]) for i in range(agents)}
        return data, load_jsonl(files["eval"])


@dataclass(frozen=True)
class Split:
    """A prepared split (``edgefed-aggregator data natural-instructions``) as the probe uses it."""

    data: dict[str, list[Example]]
    """Per agent (``agent-1`` ... as ``local`` names them), its training examples."""
    eval_examples: list[Example]
    seed: int
    """The split's seed, used as the run seed (``ferret.seed``), as the scoreboard does."""
    max_len: int | None
    """The split's token budget plus the template's room, as ``local`` sets it."""


def load_split(path: Path, agents: int) -> Split:
    """``agent-<i>.jsonl`` for ``i < agents``, ``eval.jsonl`` and ``meta.json`` of a split dir."""
    from aggregator.local.data import split_max_len

    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    missing = [
        f"agent-{i}.jsonl" for i in range(agents) if not (path / f"agent-{i}.jsonl").is_file()
    ]
    if missing:
        raise SystemExit(f"probe: {path} has no {', '.join(missing)} for {agents} agents")
    return Split(
        data={f"agent-{i + 1}": load_jsonl(path / f"agent-{i}.jsonl") for i in range(agents)},
        eval_examples=load_jsonl(path / "eval.jsonl"),
        seed=int(meta.get("seed", 0)),
        max_len=split_max_len(meta),
    )


def print_probe(
    *,
    quick: bool,
    ks: Sequence[int],
    agents: int,
    steps: int,
    lr: float,
    split_dir: Path | None = None,
) -> list[ProbeRow]:
    """Print the probe's rows (on ``split_dir``'s split when given, else the demo set)."""
    from transformers import AutoTokenizer

    from benchmarks._tiny import tiny_model
    from edge_agent.model.store import DEFAULT_MODEL, load_base, resolve_model

    if quick:
        model_dir = tiny_model(Path(tempfile.mkdtemp(prefix="ferret-probe-")) / "model")
        resolved = resolve_model(str(model_dir))
    else:
        resolved = resolve_model(DEFAULT_MODEL)
        model_dir = Path(resolved.path)
    model, _ = load_base(resolved, "fp32", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params: dict[str, Any] = {"train": {"steps": steps, "batch_size": 4, "lr": lr, "max_len": 128}}
    if split_dir is None:
        data, eval_examples = demo_data(
            agents, per_agent=16 if quick else 64, n_eval=8 if quick else 48
        )
        source = "demo"
    else:
        split = load_split(split_dir, agents)
        data, eval_examples = split.data, split.eval_examples
        params["ferret"] = {"seed": split.seed}
        if split.max_len is not None:
            params["train"]["max_len"] = split.max_len
        source = f"{split_dir} (seed {split.seed}, max_len {params['train']['max_len']})"
    print(
        f"\none-round probe: {resolved.name}, {agents} agents x {steps} SGD steps (lr {lr}, "
        f"batch 4), eval on {len(eval_examples)} held-out examples of {source}"
    )
    print(f"{'step':>8} {'eval loss':>10} {'drop':>9} {'cos(Δ̄)':>9} {'|s|/|Δ̄|':>9} {'triples':>8}")

    def show(r: ProbeRow) -> None:
        ratio = "" if r.label == "before" else f"{r.norm_ratio:>9.2f}"
        cos = "" if r.label == "before" else f"{r.cosine:>9.4f}"
        print(f"{r.label:>8} {r.loss:>10.4f} {r.drop:>+9.4f} {cos:>9} {ratio:>9} {r.triples:>8}")
        print(f"         ({time.perf_counter() - started:.0f} s so far)", flush=True)

    started = time.perf_counter()
    rows = probe(model_dir, model, tokenizer, data, eval_examples, ks, params, on_row=show)
    for r in rows:
        if not math.isfinite(r.loss):
            raise SystemExit(f"probe: the loss after {r.label} is not finite")
    return rows
