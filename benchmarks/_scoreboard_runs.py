"""The scoreboard's runs: one configuration at a time, each result on disk as it finishes.

A method configuration runs the real system: ``python -m aggregator local --data SPLIT ...``
as a subprocess (aggregator and agent processes on loopback), then its round table
(``result.json``) and ledger (per agent train seconds and bytes) are read back into a result
record (:mod:`_scoreboard_stats`). The two references train fedit's LoRA in this process on
the same split, base precision, steps and eval set: *centralised* (the pooled training data,
``agents x steps`` steps a round) and *local only* (each agent on its own data, never
sharing; the mean of their eval figures).

:class:`Store` keeps one JSON file per finished configuration in the results directory and
says which are done, so an interrupted scoreboard resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _scoreboard_rows import Variant, all_variants, slug
from _scoreboard_stats import simulated_round_seconds

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ("centralised", "local only")
FULL_PARAMETER = ("ferret", "fedavg")
"""Methods that train an unquantized copy of every weight (fp32 by default) whatever --quant."""
SIDE_KEYS = ("emulator_eval_loss",)
"""Side evaluation metrics kept per round where a method reports them (``aggregator.engine.
rounds.SIDE_EVAL_KEYS``): FedBiOT's emulator + adapter loss beside the full model's."""
METHOD_KEYS = ("svd_energy", "switch_gain_kept")
METHOD_PREFIXES = ("switch_eval_",)
"""A method's own round metrics kept in the result rows: SLoRA's switch (the stage-1 energy the
adapter keeps, the share of stage 1's eval-loss gain kept, the agents' evaluations of the switch's
adapter before stage-2 training)."""


@dataclass(frozen=True)
class Config:
    method: str
    """A method name, or one of :data:`REFERENCES`."""
    seed: int
    lr: float
    quant: str
    variant: str = ""
    """A variant's name (:mod:`_scoreboard_rows`), or "" for the method as it is."""

    @property
    def group(self) -> str:
        precision = "fp32" if self.method in FULL_PARAMETER else self.quant
        return f"{self.variant or self.method} {precision} lr={self.lr:g}"

    @property
    def name(self) -> str:
        label = slug(self.variant) if self.variant else self.method.replace(" ", "_")
        return f"{label}-{self.quant}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class Common:
    """What every configuration of one scoreboard shares."""

    model: str
    agents: int
    rounds: int
    steps: int
    batch_size: int
    bandwidth_mbps: tuple[float, ...]
    """Modelled link rate per agent (agent-1 first) for the simulated clock."""

    def bandwidth(self) -> dict[str, float]:
        return {f"agent-{i + 1}": self.bandwidth_mbps[i] for i in range(self.agents)}


class Store:
    """One JSON file per finished configuration under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, cfg: Config) -> Path:
        return self.root / f"{cfg.name}.json"

    def done(self, cfg: Config) -> bool:
        return self.path(cfg).is_file()

    def save(self, cfg: Config, result: dict[str, Any]) -> None:
        tmp = self.path(cfg).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.path(cfg))  # whole or absent: an interruption never leaves half

    def load_all(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.root.glob("*.json"))]


def run_config(
    cfg: Config,
    common: Common,
    split: Path,
    work: Path,
    *,
    runner: Callable[[Config, Common, Path, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` on the split in ``split``; the result record."""
    started = time.monotonic()
    if runner is not None:
        rows = runner(cfg, common, split, work)["rows"]
    elif cfg.method in REFERENCES:
        rows = run_reference(cfg, common, split)
    else:
        rows = run_method(cfg, common, split, work)
    return asdict(cfg) | {
        "name": cfg.name,
        "group": cfg.group,
        "rows": rows,
        "wall_seconds": time.monotonic() - started,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def for_variant(cfg: Config, common: Common) -> tuple[Variant | None, Common]:
    """The variant ``cfg`` names (None for a plain method) and the settings it runs under."""
    if not cfg.variant:
        return None, common
    variant = all_variants()[cfg.variant]
    agents = variant.agents or common.agents
    bandwidth = variant.bandwidth or common.bandwidth_mbps
    bandwidth = tuple(bandwidth) + (bandwidth[-1],) * max(0, agents - len(bandwidth))
    return variant, replace(common, agents=agents, bandwidth_mbps=bandwidth)


def local_command(cfg: Config, common: Common, split: Path, workdir: Path) -> list[str]:
    variant, common = for_variant(cfg, common)
    extra = variant.local_args() if variant else []
    return [
        sys.executable, "-m", "aggregator", "local", "--method", cfg.method,
        "--agents", str(common.agents), "--rounds", str(common.rounds),
        "--workdir", str(workdir), "--model", common.model, "--data", str(split),
        "--steps", str(common.steps), "--batch-size", str(common.batch_size),
        "--lr", f"{cfg.lr:g}", "--quant", cfg.quant, "--seed", str(cfg.seed), "--insecure",
        *extra,
    ]  # fmt: skip


def run_method(cfg: Config, common: Common, split: Path, work: Path) -> list[dict[str, float]]:
    workdir = work / cfg.name
    cmd = local_command(cfg, common, split, workdir)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{cfg.name} failed (kept in {workdir}):\n{tail}")
    result = json.loads((workdir / "result.json").read_text(encoding="utf-8"))
    per_agent = _train_tasks(workdir / "state" / "ledger.sqlite")
    rows = _rows(result["rows"], per_agent, for_variant(cfg, common)[1])
    shutil.rmtree(workdir, ignore_errors=True)  # checkpoints of whole models add up
    return rows


def _train_tasks(ledger_path: Path) -> dict[int, dict[str, dict[str, float]]]:
    """Per round, per agent: the train task's measured seconds and bytes up and down."""
    sys.path.insert(0, str(ROOT))
    from aggregator.store.ledger import Ledger

    out: dict[int, dict[str, dict[str, float]]] = {}
    with Ledger(ledger_path) as ledger:
        run_id = ledger.latest_run()
        assert run_id is not None
        for r in ledger.rounds(run_id):
            out[r.round] = {
                u.agent_id: {
                    # CPU seconds where the agent reports them (one torch thread per agent in
                    # `local`): the box's load from other work does not move the clock
                    "seconds": float(u.metrics.get("cpu_seconds", u.metrics.get("seconds", 0.0))),
                    "bytes_up": float(u.bytes_up),
                    "bytes_down": float(u.bytes_down),
                }
                for u in ledger.updates(run_id, r.round)
            }
    return out


def _rows(
    table: list[Mapping[str, Any]],
    per_agent: Mapping[int, Mapping[str, Mapping[str, float]]],
    common: Common,
) -> list[dict[str, float]]:
    """Round rows with cumulative bytes (train and eval phases, all agents) and the simulated
    clock (train phases only: evaluation is measurement)."""
    rows: list[dict[str, float]] = []
    cum_bytes = sim = 0.0
    for row in sorted(table, key=lambda r: r["round"]):
        rnd = int(row["round"])
        agents = row.get("agents") or common.agents
        if rnd > 0:
            cum_bytes += (row["bytes_up_per_agent"] + row["bytes_down_per_agent"]) * agents
            sim += simulated_round_seconds(per_agent.get(rnd, {}), common.bandwidth())
        cum_bytes += (
            row.get("eval_bytes_up_per_agent", 0.0) + row.get("eval_bytes_down_per_agent", 0.0)
        ) * common.agents
        out = {"round": float(rnd), "cum_bytes": cum_bytes, "sim_seconds": sim}
        for key, value in row.items():
            kept = key in ("eval_loss", "eval_rouge_l", "eval_em", "train_loss", *SIDE_KEYS)
            kept = kept or key in METHOD_KEYS or key.startswith(METHOD_PREFIXES)
            if kept and isinstance(value, int | float):
                out[key] = float(value)
        rows.append(out)
    return rows


def run_reference(cfg: Config, common: Common, split: Path) -> list[dict[str, float]]:
    """Centralised or local-only LoRA (fedit's adapter) on the split, in this process."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    from aggregator.local.data import prepare_local_data
    from edge_agent.model.store import load_base, resolve_model
    from edge_agent.training.data import load_jsonl
    from edge_agent.training.lora import LoraSpec, attach_lora
    from edge_agent.training.train import TrainConfig, evaluate, train_lora

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_local_data(
            str(split), Path(tmp), agents=common.agents, per_agent=1, n_eval=1, alpha=1.0, seed=0
        )
        agents = [load_jsonl(p) for p in data.train]
        evalset = [e for p in data.eval_shards for e in load_jsonl(p)]
    max_len = data.max_len or 128
    new_tokens = data.max_new_tokens or 12
    resolved = resolve_model(common.model)
    spec = LoraSpec(r=8, alpha=16.0, dropout=0.0,
                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))  # fmt: skip

    def score(model: Any, tok: Any) -> dict[str, float]:
        r = evaluate(model, tok, evalset, max_len=max_len, batch_size=8, exact_match=True,
                     max_new_tokens=new_tokens)  # fmt: skip
        return {"eval_loss": r.loss, "eval_rouge_l": r.rouge_l or 0.0,
                "eval_em": r.exact_match or 0.0}  # fmt: skip

    def trajectory(
        examples: list[Any], steps: int, seed: int
    ) -> list[tuple[dict[str, float], float]]:
        base, tok = load_base(resolved, cfg.quant)  # type: ignore[arg-type]
        model = attach_lora(base, spec, init_seed=seed)
        out = [(score(model, tok), 0.0)]
        for rnd in range(1, common.rounds + 1):
            t = TrainConfig(steps=steps, batch_size=common.batch_size, lr=cfg.lr, seed=seed + rnd,
                            max_len=max_len)  # fmt: skip
            started = time.perf_counter()
            train_lora(model, tok, examples, t)
            out.append((score(model, tok), time.perf_counter() - started))
        return out

    if cfg.method == "centralised":
        runs = [trajectory([e for a in agents for e in a], common.steps * common.agents, cfg.seed)]
    else:
        runs = [trajectory(a, common.steps, cfg.seed + 17 * (i + 1)) for i, a in enumerate(agents)]
    rows: list[dict[str, float]] = []
    sim = 0.0
    for rnd in range(common.rounds + 1):
        sim += max(run[rnd][1] for run in runs)  # the slowest trainer; nothing travels
        row = {"round": float(rnd), "cum_bytes": 0.0, "sim_seconds": sim}
        for key in ("eval_loss", "eval_rouge_l", "eval_em"):
            row[key] = sum(run[rnd][0][key] for run in runs) / len(runs)
        rows.append(row)
    return rows
