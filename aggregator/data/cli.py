"""``edgefed-aggregator data``: prepare real datasets as edgefed JSONL splits.

``data natural-instructions --out DIR`` reads Natural Instructions v1 out of the bigbench
archive (:mod:`aggregator.data.natural_instructions`), applies the token budget and splits it
across agents (:mod:`aggregator.data.split`), and writes ``agent-<i>.jsonl``, ``eval.jsonl``,
``public.jsonl`` and ``meta.json`` into ``DIR``. ``edgefed-aggregator local --data DIR`` runs
on such a directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from aggregator.errors import AggregatorError


@click.group()
def data() -> None:
    """Prepare datasets for ``local --data DIR`` and for agents."""


def token_counter(tokenizer: str) -> tuple[Callable[[list[str]], list[int]], str]:
    """Texts' token counts by ``tokenizer`` (a model spec, or ``words`` for whitespace words)."""
    if tokenizer == "words":
        return (lambda texts: [len(t.split()) for t in texts]), "words"
    from transformers import AutoTokenizer

    from edge_agent.errors import EdgeAgentError
    from edge_agent.model.store import resolve_model

    try:
        resolved = resolve_model(tokenizer)
    except EdgeAgentError as exc:
        raise AggregatorError(str(exc)) from None
    tok = AutoTokenizer.from_pretrained(str(resolved.path))

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    return count, f"{tokenizer} (sha256 {resolved.sha256[:16]})"


def prepare_natural_instructions(
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    agents: int = 2,
    per_agent: int = 64,
    n_eval: int = 48,
    n_public: int = 64,
    public_tasks: int = 2,
    split: str = "task",
    alpha: float = 0.5,
    seed: int = 0,
    max_tokens: int = 256,
    tokenizer: str = "smollm2-135m",
    archive: Path | None = None,
) -> dict[str, Any]:
    """Write a Natural Instructions split into ``out``; returns its ``meta.json`` content."""
    import json

    from aggregator.data.natural_instructions import (
        ARCHIVE_SHA256,
        archive_path,
        in_order,
        read_subtasks,
    )
    from aggregator.data.split import DEFAULT_TASKS, make_ni_split, write_split

    names = tasks or DEFAULT_TASKS
    path = archive if archive is not None else archive_path()
    subtasks = read_subtasks(path, names)
    ordered = in_order(names, subtasks)  # the order given: the last ones are public
    count, counted_by = token_counter(tokenizer)
    split_ = make_ni_split(
        ordered,
        agents=agents,
        per_agent=per_agent,
        n_eval=n_eval,
        n_public=n_public,
        public_tasks=public_tasks,
        split=split,
        alpha=alpha,
        seed=seed,
        budget=max_tokens,
        count=count,
    )
    source = {"source": "natural-instructions v1 (bigbench 1.0.0)", "archive": path.name}
    if archive is None:
        source["archive_sha256"] = ARCHIVE_SHA256
    meta_path = write_split(out, split_, source | {"tokens_counted_by": counted_by})
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta


@data.command("natural-instructions")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--tasks",
    default="",
    help="Comma-separated subtasks (names or numbers, e.g. 7,13,47); the last "
    "--public-tasks are public. Default: ten short subtasks.",
)
@click.option("--agents", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--per-agent", default=64, show_default=True, help="Training examples per agent.")
@click.option("--eval", "n_eval", default=48, show_default=True, help="Held-out eval examples.")
@click.option("--public", "n_public", default=64, show_default=True, help="Public examples.")
@click.option("--public-tasks", default=2, show_default=True, help="Subtasks no agent holds.")
@click.option(
    "--split", type=click.Choice(["task", "dirichlet"]), default="task", show_default=True
)
@click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--max-tokens", default=256, show_default=True, help="Token budget; longer examples skipped."
)
@click.option(
    "--tokenizer",
    default="smollm2-135m",
    show_default=True,
    help="Model whose tokenizer counts the budget ('words': whitespace words).",
)
@click.option(
    "--archive",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A bigbench source archive to read (default: download once into the data cache).",
)
def natural_instructions(
    out: Path,
    tasks: str,
    agents: int,
    per_agent: int,
    n_eval: int,
    n_public: int,
    public_tasks: int,
    split: str,
    alpha: float,
    seed: int,
    max_tokens: int,
    tokenizer: str,
    archive: Path | None,
) -> None:
    """Natural Instructions v1 split across agents, as edgefed JSONL files."""
    try:
        meta = prepare_natural_instructions(
            out,
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
            agents=agents,
            per_agent=per_agent,
            n_eval=n_eval,
            n_public=n_public,
            public_tasks=public_tasks,
            split=split,
            alpha=alpha,
            seed=seed,
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            archive=archive,
        )
    except AggregatorError as exc:
        click.echo(f"edgefed-aggregator: {exc}", err=True)
        sys.exit(2)
    skipped = sum(b["over_budget"] for b in meta["budget"].values())
    kept = sum(b["kept"] for b in meta["budget"].values())
    click.echo(
        f"wrote {agents} agent files, {sum(meta['eval'].values())} eval and "
        f"{sum(meta['public'].values())} public examples to {out}"
    )
    click.echo(
        f"token budget {max_tokens} ({meta['tokens_counted_by']}): {kept} examples fit, "
        f"{skipped} skipped as too long"
    )
    for i, a in enumerate(meta["agents"]):
        click.echo(f"  agent-{i}: {', '.join(f'{t} x{n}' for t, n in a['tasks'].items())}")
