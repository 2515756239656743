"""The data of ``edgefed-aggregator local``: the demo set, Natural Instructions, or a split dir.

``--data demo`` (the default) writes the built-in synthetic split; ``--data
natural-instructions`` prepares a Natural Instructions split (:mod:`aggregator.data.cli`) in
the run's directory; ``--data DIR`` uses a split prepared before (``agent-<i>.jsonl`` for
``i < agents``, ``eval.jsonl``, ``public.jsonl``, and ``meta.json`` when ``data
natural-instructions`` wrote it). Either way each agent then evaluates a disjoint shard of the
held-out set (``eval-<i+1>.jsonl``), so the example-weighted mean over agents is the whole set.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.errors import AggregatorError
from aggregator.local.demo_data import make_demo_split, write_demo

DEMO = "demo"
NATURAL_INSTRUCTIONS = "natural-instructions"
_TEMPLATE_ROOM = 32
"""Tokens added to a split's budget for the chat template around prompt and answer."""


@dataclass(frozen=True)
class LocalData:
    train: list[Path]
    """One training file per agent, in agent order."""
    eval_shards: list[Path]
    """One held-out shard per agent, in agent order."""
    public: Path
    eval_size: int
    max_len: int | None = None
    """Train and eval ``max_len`` the split asks for (None: the methods' defaults)."""
    max_new_tokens: int | None = None
    """Eval generation length the split's references need (None: the default)."""
    name: str = DEMO


def prepare_local_data(
    data: str, out: Path, *, agents: int, per_agent: int, n_eval: int, alpha: float, seed: int
) -> LocalData:
    """Write (or check) the run's data in ``out`` for ``agents`` agents."""
    out.mkdir(parents=True, exist_ok=True)
    if data == DEMO:
        split = make_demo_split(agents, per_agent=per_agent, alpha=alpha, seed=seed, n_eval=n_eval)
        files = write_demo(out, split)
        return _shard(files["eval"], [files[f"agent-{i}"] for i in range(agents)], files["public"])
    if data == NATURAL_INSTRUCTIONS:
        from aggregator.data.cli import prepare_natural_instructions

        prepare_natural_instructions(
            out, agents=agents, per_agent=per_agent, n_eval=n_eval, alpha=alpha, seed=seed
        )
        return _from_dir(out, out, agents, NATURAL_INSTRUCTIONS)
    source = Path(data).expanduser()
    if not source.is_dir():
        raise AggregatorError(
            f"--data {data!r}: expected {DEMO!r}, {NATURAL_INSTRUCTIONS!r} or a directory "
            "written by `edgefed-aggregator data ...`"
        )
    for path in source.glob("*.json*"):
        shutil.copy(path, out / path.name)
    return _from_dir(source, out, agents, str(source))


def _from_dir(source: Path, out: Path, agents: int, name: str) -> LocalData:
    train = [out / f"agent-{i}.jsonl" for i in range(agents)]
    missing = [p.name for p in [*train, out / "eval.jsonl"] if not p.is_file()]
    if missing:
        raise AggregatorError(
            f"{source}: has no {', '.join(missing)} for {agents} agents "
            "(prepare it with `edgefed-aggregator data natural-instructions --agents N`)"
        )
    data = _shard(out / "eval.jsonl", train, out / "public.jsonl")
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return LocalData(**{**data.__dict__, "name": name})
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    refs = meta.get("max_reference_tokens")
    return LocalData(
        train=data.train,
        eval_shards=data.eval_shards,
        public=data.public,
        eval_size=data.eval_size,
        max_len=split_max_len(meta),
        max_new_tokens=max(8, int(refs) + 4) if refs else None,
        name=name,
    )


def split_max_len(meta: dict[str, Any]) -> int | None:
    """Train and eval ``max_len`` for a split's ``meta.json``: its token budget plus the
    template's room (None: it has no budget, the methods' defaults apply)."""
    budget = meta.get("budget_tokens")
    return int(budget) + _TEMPLATE_ROOM if budget else None


def _shard(eval_path: Path, train: list[Path], public: Path) -> LocalData:
    lines = [ln for ln in eval_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < len(train):
        raise AggregatorError(
            f"{eval_path}: {len(lines)} eval examples cannot give each of {len(train)} agents one"
        )
    shards: list[Path] = []
    for i in range(len(train)):
        shard = eval_path.with_name(f"eval-{i + 1}.jsonl")
        shard.write_text("".join(ln + "\n" for ln in lines[i :: len(train)]), encoding="utf-8")
        shards.append(shard)
    return LocalData(train=train, eval_shards=shards, public=public, eval_size=len(lines))


def method_overrides(data: LocalData) -> dict[str, dict[str, int]]:
    """The ``train``/``eval`` parameter values a split asks for (its token budget)."""
    train: dict[str, int] = {}
    evaluation: dict[str, int] = {}
    if data.max_len is not None:
        train["max_len"] = evaluation["max_len"] = data.max_len
    if data.max_new_tokens is not None:
        evaluation["max_new_tokens"] = data.max_new_tokens
    return {k: v for k, v in (("train", train), ("eval", evaluation)) if v}
