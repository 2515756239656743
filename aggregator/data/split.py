"""Natural Instructions split across agents: token budget, task or Dirichlet split, files.

Rules (deterministic in ``seed``):

- The subtask list is taken in the order given. The last ``public_tasks`` subtasks are the
  *public* ones (no agent holds them; FedBiOT aligns its emulator on them); the others are
  *held*.
- **Token budget.** An example is kept when ``tokens(instruction + "\\n\\n" + input) +
  tokens(first reference)`` is at most ``budget``; longer ones are skipped, never cut (a cut
  passage or definition would change the task). How many were kept and skipped per subtask
  is written to ``meta.json``. The chat template adds about 15 tokens on top, so the agents'
  ``max_len`` is set to ``budget + 32`` by ``local``.
- **Eval.** ``n_eval`` held-out examples, balanced over the held subtasks, never trained on.
- **split="task"** (the papers' non-IID setting): held subtask ``j`` goes to agent
  ``j mod agents``; each agent draws ``per_agent`` examples evenly over its own subtasks.
- **split="dirichlet"**: each agent draws task shares from Dirichlet(``alpha``) over all held
  subtasks, then a multinomial of ``per_agent`` examples. Small alpha: one or two subtasks per
  agent; large alpha: the same mix everywhere.
- Training examples are drawn without replacement from what is left after eval, and no two
  agents share one; a subtask that runs out ends in a :class:`ConfigError` that says so.
- **Public.** ``n_public`` examples balanced over the public subtasks.

A record is ``{"instruction", "input", "output", "references", "task"}``: ``output`` is the
first reference (the training target), ``references`` all of them (Rouge-L and exact match
take the best over them), ``task`` the subtask name. :func:`write_split` writes
``agent-<i>.jsonl``, ``eval.jsonl``, ``public.jsonl`` and ``meta.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.data.natural_instructions import Subtask
from aggregator.errors import ConfigError

Record = dict[str, Any]
Counter = Callable[[list[str]], list[int]]
"""Token counts of a batch of texts."""

DEFAULT_TASKS: tuple[str, ...] = (
    "subtask007_mctaco_answer_generation_transient_stationary",
    "subtask013_mctaco_answer_generation_absolute_timepoint",
    "subtask020_mctaco_span_based_question",
    "subtask022_cosmosqa_passage_inappropriate_binary",
    "subtask033_winogrande_answer_generation",
    "subtask036_qasc_topic_word_to_generate_related_fact",
    "subtask039_qasc_find_overlapping_words",
    "subtask041_qasc_answer_generation",
    "subtask047_misc_answering_science_questions",
    "subtask050_multirc_answerability",
)
"""Ten subtasks whose definition plus input mostly fit a 256-token budget; the last two are
public by default. Chosen for short prompts, so a CPU run stays affordable."""


@dataclass
class NISplit:
    agents: list[list[Record]]
    eval: list[Record]
    public: list[Record]
    meta: dict[str, Any] = field(default_factory=dict)


def _record(task: Subtask, text: str, refs: tuple[str, ...]) -> Record:
    return {
        "instruction": task.instruction,
        "input": text,
        "output": refs[0],
        "references": list(refs),
        "task": task.name,
    }


def within_budget(
    tasks: Sequence[Subtask], budget: int, count: Counter
) -> tuple[dict[str, list[Record]], dict[str, dict[str, int]]]:
    """Per subtask, the records that fit ``budget`` tokens, and how many were kept/skipped."""
    if budget < 8:
        raise ConfigError(f"token budget must be at least 8, got {budget}")
    kept: dict[str, list[Record]] = {}
    report: dict[str, dict[str, int]] = {}
    for task in tasks:
        prompts = count([f"{task.instruction}\n\n{text}" for text, _ in task.examples])
        answers = count([refs[0] for _, refs in task.examples])
        records = [
            _record(task, text, refs)
            for (text, refs), p, a in zip(task.examples, prompts, answers, strict=True)
            if p + a <= budget
        ]
        kept[task.name] = records
        report[task.name] = {"kept": len(records), "over_budget": len(task.examples) - len(records)}
    return kept, report


def _even(total: int, names: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(names))
    return {n: base + (1 if i < extra else 0) for i, n in enumerate(names)}


def _take(pool: list[Record], n: int, what: str) -> list[Record]:
    if n > len(pool):
        raise ConfigError(
            f"{what}: needs {n} more examples within the token budget, only {len(pool)} left "
            f"(lower --per-agent/--eval, raise --max-tokens, or add --tasks)"
        )
    taken = pool[:n]
    del pool[:n]
    return taken


def make_ni_split(
    tasks: Sequence[Subtask],
    *,
    agents: int,
    per_agent: int,
    n_eval: int,
    n_public: int,
    public_tasks: int,
    split: str,
    alpha: float,
    seed: int,
    budget: int,
    count: Counter,
) -> NISplit:
    """Split ``tasks`` by the module's rules; ``count`` gives texts' token counts."""
    if agents < 1 or per_agent < 1 or n_eval < 0 or n_public < 0 or public_tasks < 0:
        raise ConfigError(
            "need agents >= 1, per-agent >= 1 and eval, public, public-tasks >= 0 "
            f"(got {agents}, {per_agent}, {n_eval}, {n_public}, {public_tasks})"
        )
    if split not in ("task", "dirichlet"):
        raise ConfigError(f"split must be 'task' or 'dirichlet', got {split!r}")
    if split == "dirichlet" and not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"Dirichlet alpha must be a positive number, got {alpha}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError("a subtask is listed twice")
    held = names[: len(names) - public_tasks]
    public_names = names[len(names) - public_tasks :]
    if split == "task" and len(held) < agents:
        raise ConfigError(
            f"--split task gives every agent its own subtask: {agents} agents need at least "
            f"{agents} held subtasks, have {len(held)} ({len(names)} listed, {public_tasks} public)"
        )
    if not held:
        raise ConfigError("no subtask left for the agents after the public ones")
    if n_public and not public_names:
        raise ConfigError("a public set needs --public-tasks >= 1 (or --public 0)")

    pools, budget_report = within_budget(tasks, budget, count)
    rng = random.Random(seed)
    for name in names:
        rng.shuffle(pools[name])
    eval_set: list[Record] = []
    for name, n in _even(n_eval, held).items():
        eval_set += _take(pools[name], n, f"eval from {name}")
    public: list[Record] = []
    if n_public:
        for name, n in _even(n_public, public_names).items():
            public += _take(pools[name], n, f"public set from {name}")

    counts: list[dict[str, int]] = []
    if split == "task":
        for i in range(agents):
            own = held[i::agents]
            counts.append(_even(per_agent, own))
    else:
        gen = np.random.default_rng(seed)
        for _ in range(agents):
            shares = gen.dirichlet(np.full(len(held), alpha, dtype=np.float64))
            if not np.all(np.isfinite(shares)):  # degenerate draws at tiny alpha
                shares = np.eye(len(held))[int(gen.integers(len(held)))]
            drawn = gen.multinomial(per_agent, shares / shares.sum())
            counts.append({n: int(c) for n, c in zip(held, drawn, strict=True) if c})
    agent_sets: list[list[Record]] = []
    for i, wanted in enumerate(counts):
        records: list[Record] = []
        for name, n in wanted.items():
            records += _take(pools[name], n, f"agent {i + 1}'s training set from {name}")
        rng.shuffle(records)
        agent_sets.append(records)
    rng.shuffle(eval_set)
    rng.shuffle(public)
    meta = {
        "split": split,
        "alpha": alpha if split == "dirichlet" else None,
        "seed": seed,
        "budget_tokens": budget,
        "held_tasks": held,
        "public_tasks": public_names,
        "agents": [{"file": f"agent-{i}.jsonl", "tasks": c} for i, c in enumerate(counts)],
        "eval": _tally(eval_set),
        "public": _tally(public),
        "budget": budget_report,
        "max_reference_tokens": max(
            count([ref for r in eval_set for ref in r["references"]]) or [0]
        ),
    }
    return NISplit(agents=agent_sets, eval=eval_set, public=public, meta=meta)


def _tally(records: Sequence[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["task"]] = out.get(r["task"], 0) + 1
    return dict(sorted(out.items()))


def _write_jsonl(path: Path, records: Sequence[Record]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def write_split(out: Path, split: NISplit, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write the split's files into ``out``; returns the ``meta.json`` path."""
    out.mkdir(parents=True, exist_ok=True)
    for i, records in enumerate(split.agents):
        _write_jsonl(out / f"agent-{i}.jsonl", records)
    _write_jsonl(out / "eval.jsonl", split.eval)
    _write_jsonl(out / "public.jsonl", split.public)
    meta_path = out / "meta.json"
    meta = {"format": "edgefed-split/1", **(extra_meta or {}), **split.meta}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta_path
