"""The scoreboard: every method and the references over seeds on Natural Instructions.

Run: ``python benchmarks/scoreboard.py [--methods fedit,slora,ferret,fedbiot,fedpipe,fedavg]
[--seeds 0,1,2] [--rounds 3] [--quant nf4] [--lr-grid "fedit=1e-3,3e-4;ferret=0.05,0.01"]
[--results DIR] [--quick]``.

1. Per seed, a Natural Instructions split (``edgefed-aggregator data natural-instructions``,
   the default ten subtasks, one held set per agent, 2 public subtasks) in ``DIR/data/seed-S``.
2. Learning rates: each method with more than one grid value runs once per value on the first
   seed (the same rounds and steps as the comparison: the tuning budget is one run per grid
   point, the same for every method); the value with the best final Rouge-L (then lowest eval
   loss) is kept. A method without a grid entry uses the default of ``--lr`` (``--ferret-lr``
   and ``--fedavg-lr`` for the SGD methods).
3. Every method at its chosen rate, and the centralised and local-only references, on every
   seed: ``python -m aggregator local --data DIR/data/seed-S --seed S ...`` per method.
4. ``docs/scoreboard.md``: the tables (mean ± sd over seeds, n; a gap no larger than the
   spread is "no difference") and plots of Rouge-L and loss per round, per cumulative byte and
   per simulated second (per round the slowest agent's measured train time plus its bytes at
   its modelled bandwidth, ``--bandwidth``: all agents share this machine's cores, so wall
   clock says nothing about a deployment).

Each finished configuration is written to ``DIR/results/<name>.json`` as it completes and is
skipped on the next invocation: an interrupted scoreboard resumes where it stopped, and the
tables are rebuilt from whatever is on disk (``--tables-only`` just rebuilds them).
``--quick`` (CI): a tiny random model, fedit and fedavg (no references), two seeds, one round, in a
temp dir.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _scoreboard_plots import plot_metric  # noqa: E402
from _scoreboard_rows import SECTIONS, Section, all_variants  # noqa: E402
from _scoreboard_runs import REFERENCES, Common, Config, Store, run_config  # noqa: E402
from _scoreboard_stats import final, paired_table, reach_table, summary_table  # noqa: E402

ALL_METHODS = "fedit,slora,ferret,fedbiot,fedpipe,fedavg"
SGD_METHODS = ("ferret", "fedavg")


def parse_grid(text: str) -> dict[str, list[float]]:
    """``"fedit=1e-3,3e-4;ferret=0.05"`` → ``{"fedit": [0.001, 0.0003], "ferret": [0.05]}``."""
    grid: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, values = part.partition("=")
        grid[method.strip()] = [float(v) for v in values.split(",") if v.strip()]
    return grid


def prepare_split(
    args: argparse.Namespace, seed: int, agents: int | None = None, alpha: float | None = None
) -> Path:
    """The seed's split for ``agents`` agents (the scoreboard's count unless a section runs
    more), by subtask or, given ``alpha``, Dirichlet(``alpha``); written once and reused by
    every configuration of that seed."""
    agents = agents or args.agents
    suffix = "" if agents == args.agents else f"-a{agents}"
    suffix += "" if alpha is None else f"-alpha{alpha:g}"
    out = args.results / "data" / f"seed-{seed}{suffix}"
    if (out / "meta.json").is_file():
        return out
    from aggregator.data.cli import prepare_natural_instructions

    prepare_natural_instructions(
        out, tasks=tuple(args.tasks.split(",")) if args.tasks else (), agents=agents,
        per_agent=args.per_agent, n_eval=args.eval_examples, n_public=args.public,
        seed=seed, max_tokens=args.max_tokens, archive=args.archive,
        split="task" if alpha is None else "dirichlet", alpha=alpha or 0.5,
    )  # fmt: skip
    return out


def default_lr(args: argparse.Namespace, method: str) -> float:
    return {"ferret": args.ferret_lr, "fedavg": args.fedavg_lr}.get(method, args.lr)


def run_all(args: argparse.Namespace, common: Common, store: Store) -> dict[str, float]:
    """Every configuration not yet on disk; returns the learning rate chosen per method."""
    work = args.results / "work"
    grid = parse_grid(args.lr_grid)
    methods = [m for m in args.methods.split(",") if m] + [
        r for r in REFERENCES if r in args.references.split(",")
    ]
    seeds = [int(s) for s in args.seeds.split(",")]

    def ensure(cfg: Config) -> dict[str, Any] | None:
        if store.done(cfg):
            print(f"  done before: {cfg.name}", flush=True)
            return json.loads(store.path(cfg).read_text(encoding="utf-8"))  # type: ignore[no-any-return]
        print(f"  running {cfg.name} ...", flush=True)
        variant = all_variants().get(cfg.variant)
        try:
            split = prepare_split(
                args, cfg.seed, variant.agents if variant else None,
                variant.alpha if variant else None,
            )  # fmt: skip
            result = run_config(cfg, common, split, work)
        except RuntimeError as exc:
            print(f"  FAILED {exc}", flush=True)
            return None
        store.save(cfg, result)
        print(f"  finished {cfg.name} in {result['wall_seconds']:.0f} s: Rouge-L "
              f"{final(result, 'eval_rouge_l'):.4f}", flush=True)  # fmt: skip
        return result

    chosen: dict[str, float] = {}
    for method in methods:
        values = grid.get(method) or [default_lr(args, "fedit" if method in REFERENCES else method)]
        scored = []
        for lr in values:
            result = ensure(Config(method, seeds[0], lr, args.quant))
            if result is not None:
                rouge, loss = final(result, "eval_rouge_l"), final(result, "eval_loss")
                scored.append((-_nan_low(rouge), _nan_high(loss), lr))
        if not scored:
            continue
        chosen[method] = min(scored)[2]
        for seed in seeds[1:]:
            ensure(Config(method, seed, chosen[method], args.quant))
    variants = [v for s in selected_sections(args) for v in s.variants if not v.retired]
    only = [n for n in getattr(args, "variants", "").split(",") if n]
    unknown = set(only) - {v.name for v in variants}
    if unknown:
        raise SystemExit(f"scoreboard: no such row in the selected sections: {sorted(unknown)}")
    if only:  # run these rows now; the tables still show every row on disk
        variants = [v for v in variants if v.name in only]
    for variant in sorted(variants, key=lambda v: v.expensive):  # stable: cheap rows first
        lr = chosen.get(variant.method, default_lr(args, variant.method))
        for seed in seeds:
            ensure(Config(variant.method, seed, lr, args.quant, variant.name))
    return chosen


def chosen_on_disk(args: argparse.Namespace, store: Store) -> dict[str, float]:
    """The rates :func:`run_all` would choose, from the results on disk alone: a method counts
    once every point of its grid has its first-seed result (an interrupted scoreboard's tables
    show the methods whose tuning is finished)."""
    grid = parse_grid(args.lr_grid)
    seed = int(args.seeds.split(",")[0])
    methods = [m for m in args.methods.split(",") if m] + [
        r for r in REFERENCES if r in args.references.split(",")
    ]
    chosen: dict[str, float] = {}
    for method in methods:
        values = grid.get(method) or [default_lr(args, "fedit" if method in REFERENCES else method)]
        cfgs = [Config(method, seed, lr, args.quant) for lr in values]
        if not all(store.done(c) for c in cfgs):
            continue
        scored = []
        for cfg in cfgs:
            result = json.loads(store.path(cfg).read_text(encoding="utf-8"))
            rouge, loss = final(result, "eval_rouge_l"), final(result, "eval_loss")
            scored.append((-_nan_low(rouge), _nan_high(loss), cfg.lr))
        chosen[method] = min(scored)[2]
    return chosen


def _pending_lines(args: argparse.Namespace, chosen: dict[str, float]) -> list[str]:
    """Methods asked for whose learning-rate tuning is not all on disk yet (a partial table
    says so instead of silently leaving them out)."""
    asked = [m for m in args.methods.split(",") if m] + [
        r for r in REFERENCES if r in args.references.split(",")
    ]
    pending = [m for m in asked if m not in chosen]
    if not pending:
        return []
    return [
        "",
        f"**Not in the tables yet** (their tuning runs are not all on disk): {', '.join(pending)}.",
    ]


def selected_sections(args: argparse.Namespace) -> list[Section]:
    keys = [k for k in getattr(args, "sections", "").split(",") if k]
    unknown = set(keys) - {s.key for s in SECTIONS}
    if unknown:
        raise SystemExit(f"scoreboard: unknown section(s) {', '.join(sorted(unknown))}")
    return [s for s in SECTIONS if s.key in keys]


def _row_name(result: dict[str, Any]) -> str:
    """The row a result belongs to: its variant's name, or its method for a main-table row."""
    return str(result.get("variant") or result["method"])


def _group_of(rows: list[dict[str, Any]], name: str) -> str | None:
    """The table group (method, quant and rate) of the row ``name``; None when it has none."""
    return next((r["group"] for r in rows if _row_name(r) == name), None)


def section_lines(
    args: argparse.Namespace, results: list[dict[str, Any]], chosen: dict[str, float]
) -> list[str]:
    """One table and a Rouge-L and an eval-loss plot per selected section."""
    lines: list[str] = []
    for section in selected_sections(args):
        names = {v.name for v in section.variants}
        rows = [
            r
            for r in results
            if r["quant"] == args.quant
            and (
                r.get("variant") in names
                or (
                    not r.get("variant")
                    and r["method"] in section.rows
                    and chosen.get(r["method"]) == r["lr"]
                )
            )
        ]
        if not rows:
            continue
        ref = _group_of(rows, section.reference)
        img = plot_metric(rows, "eval_rouge_l", "eval Rouge-L",
                          args.img_dir / f"scoreboard-{section.key}-rouge.png",
                          f"{section.title}: eval Rouge-L, mean ± sd over seeds")  # fmt: skip
        loss = plot_metric(rows, "eval_loss", "eval loss",
                           args.img_dir / f"scoreboard-{section.key}-loss.png",
                           f"{section.title}: eval loss, mean ± sd over seeds")  # fmt: skip
        lines += ["", f"## {section.title}", "", section.note, "", *summary_table(rows, ref),
                  *_paired_lines(rows, ref), *(_reach_lines(rows, ref) if section.reach else [])]  # fmt: skip
        for against, judged in _pairs_by_reference(section.pairs):  # rows judged against
            pair = [r for r in rows if _row_name(r) in (against, *judged)]  # their own reference
            own = _group_of(pair, against)
            lines += [
                *_paired_lines(pair, own),
                *(_reach_lines(pair, own) if section.reach else []),
            ]
        lines += ["", f"![{section.key}]({_rel(img, args.doc)})", "",
                  f"![{section.key} loss]({_rel(loss, args.doc)})", ""]  # fmt: skip
        seeds = len([s for s in str(getattr(args, "seeds", "")).split(",") if s])
        for v in section.variants:
            split = "" if v.alpha is None else f" on a Dirichlet(α = {v.alpha:g}) split"
            opts = " ".join(v.local_args())
            runs = sum(1 for r in rows if r.get("variant") == v.name)
            todo = (f" — the option was {v.retired}" if v.retired
                    else " — **not run yet**" if not runs
                    else f" — {runs} of {seeds} seeds so far" if runs < seeds else "")  # fmt: skip
            lines.append(f"- `{v.name}`: {f'`{opts}`' if opts else 'the defaults'}{split}{todo}")
    return lines


def _pairs_by_reference(pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, list[str]]]:
    """A section's (row, reference) pairs as one table per reference, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for row, against in pairs:
        grouped.setdefault(against, []).append(row)
    return list(grouped.items())


def _paired_lines(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    table = paired_table(rows, reference)
    if not table:
        return []
    return ["", f"Seed-matched, against {reference} on the seeds both ran (the gap's own spread "
            "judges it):", "", *table]  # fmt: skip


def _reach_lines(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    table = reach_table(rows, reference)
    if not table:
        return []
    return ["", f"How soon each row reaches {reference}'s final Rouge-L on the same seed:",
            "", *table]  # fmt: skip


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _nan_high(x: float) -> float:
    return math.inf if math.isnan(x) else x


def write_doc(args: argparse.Namespace, store: Store, chosen: dict[str, float], cmd: str) -> Path:
    results = store.load_all()
    kept = [
        r
        for r in results
        if chosen.get(r["method"]) == r["lr"] and r["quant"] == args.quant and not r.get("variant")
    ]
    tuning = [
        r
        for r in results
        if r["method"] in chosen
        and r["seed"] == int(args.seeds.split(",")[0])
        and not r.get("variant")
    ]
    img = args.img_dir
    rouge = plot_metric(kept, "eval_rouge_l", "eval Rouge-L", img / "scoreboard-rouge.png",
                        "eval Rouge-L (held-out Natural Instructions), mean ± sd over seeds")  # fmt: skip
    loss = plot_metric(kept, "eval_loss", "eval loss", img / "scoreboard-loss.png",
                       "eval loss (held-out Natural Instructions), mean ± sd over seeds")  # fmt: skip
    # the split's description; kept beside the results (data/ is not committed)
    meta_path = args.results / "data" / f"seed-{args.seeds.split(',')[0]}" / "meta.json"
    kept_meta = args.results / "split-meta.json"
    if meta_path.is_file():
        kept_meta.write_text(meta_path.read_text(encoding="utf-8"), encoding="utf-8")
    meta = json.loads(kept_meta.read_text(encoding="utf-8")) if kept_meta.is_file() else {}
    reference = "fedavg" if "fedavg" in chosen else None
    ref_group = next((r["group"] for r in kept if r["method"] == reference), None)
    lines = [
        "# Scoreboard: every method on Natural Instructions",
        "",
        f"Written by `benchmarks/scoreboard.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        "(results are rebuilt from `DIR/results/*.json`; a rerun skips what is done).",
        "",
        "Command:",
        "",
        f"    {cmd}",
        "",
        "## Final round, mean ± sd over seeds",
        "",
        *summary_table(kept, ref_group),
        "",
        "A gap no larger than the larger of the two standard deviations is reported as *no "
        "difference*; with fewer than two runs a row is not judged.",
        *_paired_lines(kept, ref_group),
        # the LoRA baseline too: what SLoRA, FedPipe and FedBiOT claim against
        *_paired_lines(kept, next((r["group"] for r in kept if r["method"] == "fedit"), None)),
        *_reach_lines(kept, ref_group),
        *_pending_lines(args, chosen),
        "",
        f"![Rouge-L]({_rel(rouge, args.doc)})",
        "",
        f"![loss]({_rel(loss, args.doc)})",
        *section_lines(args, results, chosen),
        "",
        "## Learning rates (one run per grid point on the first seed; best final Rouge-L)",
        "",
        "| method | lr | final Rouge-L | final eval loss | chosen |",
        "|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['lr']:g} | {final(r, 'eval_rouge_l'):.4f} | "
            f"{final(r, 'eval_loss'):.4f} | {'yes' if chosen.get(r['method']) == r['lr'] else ''} |"
            for r in sorted(tuning, key=lambda r: (r["method"], r["lr"]))
        ],  # fmt: skip
        "",
        "## Setup",
        "",
        f"- Data: {meta.get('source', 'Natural Instructions')}; held subtasks "
        f"{', '.join(meta.get('held_tasks', []))}; public {', '.join(meta.get('public_tasks', []))}; "
        f"split `{meta.get('split', '?')}`, token budget {meta.get('budget_tokens', '?')} "
        f"({meta.get('tokens_counted_by', '?')}); one split per seed.",
        f"- {args.agents} agents, {args.rounds} rounds, {args.steps} local steps of batch "
        f"{args.batch_size}, base precision `{args.quant}` for every LoRA method and the "
        "references (ferret and fedavg train an unquantized fp32 copy: full-parameter methods).",
        f"- Simulated clock: modelled bandwidth {', '.join(f'{b:g}' for b in args.bandwidth)} "
        "Mbit/s for agent-1, agent-2, ...; bytes are the train phase's, both ways.",
        "- MB on the wire: both phases (train and evaluation), all agents, cumulative.",
    ]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return args.doc


def _rel(path: Path, doc: Path) -> str:
    try:
        return str(path.resolve().relative_to(doc.resolve().parent))
    except ValueError:
        return str(path)


def quick_setup(args: argparse.Namespace) -> None:
    from _tiny import tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="edgefed-scoreboard-quick-"))
    args.model = str(tiny_model(scratch / "tiny"))
    args.methods, args.seeds, args.rounds, args.steps, args.batch_size = (
        "fedit,fedavg",
        "0,1",
        1,
        1,
        2,
    )
    args.references, args.sections = (
        "",
        "",
    )  # the references run the same code path as a method; CI skips them
    args.per_agent, args.eval_examples, args.public, args.max_tokens = 4, 4, 2, 200
    args.results, args.doc, args.img_dir = scratch, scratch / "scoreboard.md", scratch / "img"
    from aggregator.data.natural_instructions import data_cache_dir

    if args.archive is None and not (data_cache_dir() / "bigbench-1.0.0.tar.gz").is_file():
        from _scoreboard_quick import stand_in_archive

        args.archive = stand_in_archive(scratch / "bigbench-1.0.0.tar.gz")
        print(
            f"quick: no bigbench archive cached; a stand-in archive of demo tasks: {args.archive}"
        )
    args.tasks = args.tasks or "20,33,22,39"  # short prompts: they fit the 200-token budget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=ALL_METHODS)
    ap.add_argument("--references", default=",".join(REFERENCES))
    ap.add_argument("--sections", default=",".join(s.key for s in SECTIONS),
                    help="Comparisons beyond the main table (benchmarks/_scoreboard_rows.py).")  # fmt: skip
    ap.add_argument(
        "--variants",
        default="",
        help="Run only these rows of the selected sections (names, comma-separated).",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--per-agent", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=48)
    ap.add_argument("--public", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--tasks", default="", help="Subtasks (default: the data command's ten).")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA methods' default rate.")
    ap.add_argument("--ferret-lr", type=float, default=0.05)
    ap.add_argument("--fedavg-lr", type=float, default=0.01)
    ap.add_argument("--lr-grid", default="", help='e.g. "fedit=1e-3,3e-4;ferret=0.05,0.01"')
    ap.add_argument("--bandwidth", type=lambda s: [float(x) for x in s.split(",")],
                    default=[100.0, 20.0], help="Mbit/s per agent, for the simulated clock.")  # fmt: skip
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--archive", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "scoreboard-results")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "scoreboard.md")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--tables-only", action="store_true", help="Rebuild the doc from disk.")
    ap.add_argument("--quick", action="store_true", help="Tiny model, 2 methods, CI.")
    args = ap.parse_args()
    argv = [a for a in sys.argv[1:] if a != "--tables-only"]  # the command that ran the rows
    cmd = "python benchmarks/scoreboard.py " + " ".join(shlex.quote(a) for a in argv)
    if args.quick:
        quick_setup(args)
    while len(args.bandwidth) < args.agents:
        args.bandwidth.append(args.bandwidth[-1])
    common = Common(model=args.model, agents=args.agents, rounds=args.rounds, steps=args.steps,
                    batch_size=args.batch_size, bandwidth_mbps=tuple(args.bandwidth))  # fmt: skip
    store = Store(args.results / "results")
    started = time.monotonic()
    if args.tables_only:
        chosen = chosen_on_disk(args, store)
    else:
        from aggregator.errors import AggregatorError

        try:
            chosen = run_all(args, common, store)
        except AggregatorError as exc:  # bad data or options: one message, not a traceback
            print(f"scoreboard: {exc}", file=sys.stderr)
            return 2
        (args.results / "chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    doc = write_doc(args, store, chosen, cmd)
    text = doc.read_text(encoding="utf-8").split("## Final round, mean ± sd over seeds\n\n")[1]
    print(text.split("\n\n")[0])
    print(f"scoreboard: {doc}  ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
