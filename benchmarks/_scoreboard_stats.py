"""The scoreboard's arithmetic: the simulated clock, mean ± sd over seeds, verdicts, tables.

Pure functions over result records (plain dicts, as the runs store them), so they are tested
without running anything.

A *result* is one finished configuration (one method or reference, one learning rate, one
seed): ``{"name", "group", "method", "seed", "lr", "rows": [{"round", "eval_loss",
"eval_rouge_l", "eval_em", "cum_bytes", "sim_seconds"}, ...]}``; row 0 is the base before
training. A *group* is the same configuration over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def simulated_round_seconds(
    agents: Mapping[str, Mapping[str, float]], bandwidth_mbps: Mapping[str, float]
) -> float:
    """One round on the simulated clock: the slowest agent's measured train time plus the
    time its bytes (up and down) take at its modelled bandwidth.

    ``agents``: per agent ``{"seconds", "bytes_up", "bytes_down"}`` of the round's train task.
    """
    slowest = 0.0
    for agent_id, a in agents.items():
        rate = bandwidth_mbps[agent_id] * 1e6 / 8  # bytes per second
        transfer = (a["bytes_up"] + a["bytes_down"]) / rate
        slowest = max(slowest, a["seconds"] + transfer)
    return slowest


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float | None
    """Sample standard deviation over seeds (n - 1); None with one run."""
    n: int

    def cell(self, spec: str) -> str:
        if self.n == 0:
            return "–"
        sd = "" if self.sd is None else f" ± {format(self.sd, spec)}"
        return f"{format(self.mean, spec)}{sd}"


def stat(values: Sequence[float]) -> Stat:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Stat(math.nan, None, 0)
    sd = statistics.stdev(finite) if len(finite) > 1 else None
    return Stat(statistics.fmean(finite), sd, len(finite))


def verdict(a: Stat, b: Stat, *, higher_is_better: bool = True) -> str:
    """How ``a`` compares with ``b``: "better", "worse", or "no difference" when the gap is no
    larger than the spread (the larger of the two standard deviations); "not judged" when
    either has fewer than two runs."""
    if a.sd is None or b.sd is None or a.n < 2 or b.n < 2:
        return "not judged (n < 2)"
    gap = a.mean - b.mean
    if abs(gap) <= max(a.sd, b.sd):
        return "no difference"
    return "better" if (gap > 0) == higher_is_better else "worse"


def final(result: Mapping[str, Any], key: str) -> float:
    """The value of ``key`` in the last round that has it (NaN if none)."""
    for row in reversed(result["rows"]):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return math.nan


def first(result: Mapping[str, Any], key: str) -> float:
    rows = [r for r in result["rows"] if r["round"] == 0 and key in r]
    return float(rows[0][key]) if rows else math.nan


def groups(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        out.setdefault(r["group"], []).append(r)
    return out


def summary_table(results: Sequence[Mapping[str, Any]], reference: str | None) -> list[str]:
    """Markdown rows: one per group, mean ± sd over seeds, and its verdict against
    ``reference`` (a group name) on the final Rouge-L."""
    by_group = groups(results)
    stats = {
        g: {
            "rouge": stat([final(r, "eval_rouge_l") for r in rs]),
            "rouge0": stat([first(r, "eval_rouge_l") for r in rs]),
            "loss": stat([final(r, "eval_loss") for r in rs]),
            "em": stat([final(r, "eval_em") for r in rs]),
            "mb": stat([final(r, "cum_bytes") / 1e6 for r in rs]),
            "sim": stat([final(r, "sim_seconds") for r in rs]),
        }
        for g, rs in by_group.items()
    }
    ref = stats.get(reference) if reference else None
    lines = [
        f"| configuration | n | Rouge-L round 0 | Rouge-L last | eval loss last | EM last "
        f"| MB on the wire | simulated s | vs {reference or '-'} (Rouge-L) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, s in sorted(stats.items(), key=lambda kv: -_nan_low(kv[1]["rouge"].mean)):
        judged = "—" if ref is None or g == reference else verdict(s["rouge"], ref["rouge"])
        lines.append(
            f"| {g} | {s['rouge'].n} | {s['rouge0'].cell('.4f')} | {s['rouge'].cell('.4f')} "
            f"| {s['loss'].cell('.4f')} | {s['em'].cell('.3f')} | {s['mb'].cell('.1f')} "
            f"| {s['sim'].cell('.0f')} | {judged} |"
        )
    return lines


def paired_table(results: Sequence[Mapping[str, Any]], reference: str | None) -> list[str]:
    """Markdown rows: each group against ``reference`` on the seeds both ran (the same split and
    eval set per seed), final Rouge-L per seed and the paired gap, mean ± sd over those seeds.

    Seed-matching removes what one seed's split does to every method alike; the verdict reads the
    gap's own spread: "no difference" when ``|mean| ≤ sd``, "not judged" under two shared seeds.
    Empty without a reference among the results."""
    by_group = groups(results)
    if reference is None or reference not in by_group:
        return []
    ref = {int(r["seed"]): final(r, "eval_rouge_l") for r in by_group[reference]}
    lines = [
        f"| configuration | shared seeds | Rouge-L per seed | {reference} per seed "
        "| gap (mean ± sd) | verdict | paired t-test p |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, rs in sorted(by_group.items()):
        if g == reference:
            continue
        mine = {int(r["seed"]): final(r, "eval_rouge_l") for r in rs}
        seeds = sorted(s for s in set(mine) & set(ref) if math.isfinite(mine[s] - ref[s]))
        if not seeds:
            lines.append(f"| {g} | none | | | – | not judged (no shared seed) | – |")
            continue
        gap = stat([mine[s] - ref[s] for s in seeds])
        spread = "" if gap.sd is None else f" ± {gap.sd:.4f}"
        p = _paired_p([mine[s] for s in seeds], [ref[s] for s in seeds])
        if gap.sd is None:
            judged = "not judged (n < 2)"
        elif abs(gap.mean) <= gap.sd:
            judged = "no difference"
        else:
            judged = "better" if gap.mean > 0 else "worse"
        lines.append(
            f"| {g} | {','.join(map(str, seeds))} | {' / '.join(f'{mine[s]:.4f}' for s in seeds)} "
            f"| {' / '.join(f'{ref[s]:.4f}' for s in seeds)} | {gap.mean:+.4f}{spread} | {judged} "
            f"| {'–' if p is None else f'{p:.2f}'} |"
        )
    return lines


def _paired_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value (scipy), shown beside the spread rule's verdict: with three
    seeds a gap just above its spread is still weak evidence. None under two pairs or when every
    gap is the same (no spread to test against)."""
    gaps = [x - y for x, y in zip(a, b, strict=True)]
    if len(gaps) < 2 or max(gaps) - min(gaps) < 1e-12:
        return None
    from scipy.stats import ttest_rel

    return float(ttest_rel(a, b).pvalue)


def reach_table(results: Sequence[Mapping[str, Any]], reference: str | None) -> list[str]:
    """Markdown rows: how soon each group reaches ``reference``'s final Rouge-L on the same seed
    (same split, same eval set): per run the first trained round at or above it, on the
    simulated clock and in rounds, mean ± sd over the runs that reached it, and how many of the
    runs with a reference seed did. Empty without a reference among the results."""
    by_group = groups(results)
    if reference is None or reference not in by_group:
        return []
    target = {int(r["seed"]): final(r, "eval_rouge_l") for r in by_group[reference]}
    lines = [
        "| configuration | runs reaching it | simulated s to reach | rounds to reach |",
        "|---|---|---|---|",
    ]
    for g, rs in sorted(by_group.items()):
        matched = [r for r in rs if math.isfinite(target.get(int(r["seed"]), math.nan))]
        hits = [
            next(
                (
                    (float(row.get("sim_seconds", math.nan)), float(row["round"]))
                    for row in sorted(r["rows"], key=lambda row: row["round"])
                    if row["round"] > 0
                    and float(row.get("eval_rouge_l", -math.inf)) >= target[int(r["seed"])]
                ),
                None,
            )
            for r in matched
        ]
        reached = [h for h in hits if h is not None]
        secs = stat([h[0] for h in reached])
        rounds = stat([h[1] for h in reached])
        lines.append(
            f"| {g} | {len(reached)} of {len(matched)} | {secs.cell('.0f')} "
            f"| {rounds.cell('.1f')} |"
        )
    return lines


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def curves(
    rs: Sequence[Mapping[str, Any]], x_key: str, y_key: str
) -> tuple[list[float], list[float], list[float]]:
    """Per round over seeds: mean x, mean y and sd of y (0 with one seed)."""
    rounds = sorted({row["round"] for r in rs for row in r["rows"]})
    xs: list[float] = []
    ys: list[float] = []
    sds: list[float] = []
    for rnd in rounds:
        pts = [
            (float(row.get(x_key, rnd)), float(row[y_key]))
            for r in rs
            for row in r["rows"]
            if row["round"] == rnd and isinstance(row.get(y_key), int | float)
        ]
        if not pts:
            continue
        xs.append(statistics.fmean(p[0] for p in pts))
        ys.append(statistics.fmean(p[1] for p in pts))
        sds.append(statistics.stdev(p[1] for p in pts) if len(pts) > 1 else 0.0)
    return xs, ys, sds
