"""The scoreboard's plots: eval Rouge-L and eval loss per round, per cumulative byte and per
simulated second, one line per configuration (mean over seeds, a band of ± one sd)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from _scoreboard_stats import curves, groups

AXES = (
    ("round", "round", "linear"),
    ("cum_bytes", "cumulative bytes on the wire, all agents", "log"),
    ("sim_seconds", "simulated seconds (slowest agent: train + transfer)", "linear"),
)


def scale_of(x_key: str) -> str:
    return next(scale for key, _, scale in AXES if key == x_key)


def plot_metric(
    results: Sequence[Mapping[str, Any]], key: str, label: str, out: Path, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for i, (group, rs) in enumerate(sorted(groups(results).items())):
        color = f"C{i % 10}"
        reference = rs[0]["method"] in ("centralised", "local only")
        for ax, (x_key, _, _) in zip(axes, AXES, strict=True):
            if reference and x_key == "cum_bytes":
                continue  # nothing travels
            xs, ys, sds = curves(rs, x_key, key)
            if scale_of(x_key) == "log":  # a log axis shows only what has moved bytes
                kept = [i for i, x in enumerate(xs) if x > 0]
                xs, ys, sds = ([v[i] for i in kept] for v in (xs, ys, sds))
            if not xs:
                continue
            ax.plot(xs, ys, "--" if reference else "-", marker="o", ms=3, color=color,
                    label=f"{group} (n={len(rs)})")  # fmt: skip
            lo = [y - s for y, s in zip(ys, sds, strict=True)]
            hi = [y + s for y, s in zip(ys, sds, strict=True)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    for ax, (_, xlabel, scale) in zip(axes, AXES, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_xscale(scale)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
