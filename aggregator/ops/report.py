"""``edgefed-aggregator report``: plots of a run from its ledger, and a page that shows them.

Reads the SQLite ledger of a state directory (read-only use; the service may keep running) and
writes into an output directory::

    loss.png    train loss (example-weighted mean, and each agent's own) and eval loss per round
    eval.png    eval exact match per round
    bytes.png   bytes up and down per agent per round (log scale when they span decades)
    index.html  one self-contained page: the three plots inline (base64) and a table per round
                and per agent update; it loads nothing from anywhere

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from aggregator.errors import StateError
from aggregator.store.ledger import Ledger, RoundRow, UpdateRow

log = logging.getLogger(__name__)

PLOTS = ("loss", "eval", "bytes")
_SIZE = (7.0, 3.8)
_DPI = 100


@dataclass(frozen=True)
class RunReport:
    """What the report shows: one run's rounds, accepted updates and rejections per round."""

    run_id: str
    method: str
    rounds: list[RoundRow]
    updates: list[UpdateRow]
    rejected: dict[int, int]

    @property
    def agents(self) -> list[str]:
        return sorted({u.agent_id for u in self.updates})

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of a round metric, for the rounds that have a finite value."""
        xs: list[int] = []
        ys: list[float] = []
        for r in self.rounds:
            value = r.metrics.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                xs.append(r.round)
                ys.append(float(value))
        return xs, ys


@dataclass(frozen=True)
class ReportFiles:
    loss: Path
    eval: Path
    bytes: Path
    html: Path


def collect(ledger: Ledger, run_id: str | None = None) -> RunReport:
    """Read one run (default: the latest) from ``ledger``."""
    run_id = run_id or ledger.latest_run()
    run = ledger.run(run_id) if run_id else None
    if run_id is None or run is None:
        which = f"run {run_id!r}" if run_id else "any run"
        raise StateError(f"the ledger {ledger.path} has no record of {which}")
    rounds = ledger.rounds(run_id)
    updates = [u for r in rounds for u in ledger.updates(run_id, r.round)]
    rejected: dict[int, int] = {}
    for row in ledger.rejections(run_id):
        rejected[row.round] = rejected.get(row.round, 0) + 1
    return RunReport(run_id, str(run["method"]), rounds, updates, rejected)


def write_report(state_dir: Path, out_dir: Path, run_id: str | None = None) -> ReportFiles:
    """Write the three PNG plots and ``index.html`` for a run of ``state_dir`` into ``out_dir``."""
    path = state_dir / "ledger.sqlite"
    if not path.is_file():
        raise StateError(f"{state_dir}: no ledger here (is this the aggregator's state_dir?)")
    with Ledger(path) as ledger:
        report = collect(ledger, run_id)
    if not report.rounds:
        raise StateError(f"run {report.run_id!r} has no rounds yet: nothing to plot")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        images = {name: _render(_draw(name, report)) for name in PLOTS}
        files = ReportFiles(
            loss=out_dir / "loss.png",
            eval=out_dir / "eval.png",
            bytes=out_dir / "bytes.png",
            html=out_dir / "index.html",
        )
        for name, data in images.items():
            (out_dir / f"{name}.png").write_bytes(data)
        files.html.write_text(render_html(report, images), encoding="utf-8")
    except OSError as exc:
        raise StateError(f"cannot write the report into {out_dir}: {exc}") from None
    log.info("report of run %s (%d rounds) in %s", report.run_id, len(report.rounds), out_dir)
    return files


# --- plots ------------------------------------------------------------------------------------


def _draw(name: str, report: RunReport) -> Figure:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if name == "loss":
        _plot_loss(fig.add_subplot(), report)
    elif name == "eval":
        _plot_eval(fig.add_subplot(), report)
    else:
        up, down = fig.subplots(1, 2, sharey=True)
        _plot_bytes(up, report, "bytes_up", "uplink (agent → aggregator)")
        _plot_bytes(down, report, "bytes_down", "downlink (aggregator → agent)")
        fig.suptitle(f"bytes per agent per round — run {report.run_id}", fontsize="medium")
    return fig


def _render(fig: Figure) -> bytes:
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    buffer = BytesIO()
    canvas.print_png(buffer, metadata={"Software": "edgefed"})
    return buffer.getvalue()


def _colors(agents: Iterable[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {a: palette[i % len(palette)] for i, a in enumerate(agents)}


def _round_axis(ax: Axes, title: str) -> None:
    ax.set_xlabel("round")
    ax.set_title(title, fontsize="medium")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_loss(ax: Axes, report: RunReport) -> None:
    colors = _colors(report.agents)
    drawn = False
    for agent in report.agents:
        pts = [
            (u.round, float(u.metrics["train_loss"]))
            for u in report.updates
            if u.agent_id == agent and _finite(u.metrics.get("train_loss"))
        ]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "o",
                ms=4,
                alpha=0.6,
                color=colors[agent],
                label=f"train · {agent}",
            )
            drawn = True
    for key, label, style in (
        ("train_loss", "train (weighted mean)", "-"),
        ("eval_loss", "eval", "--"),
    ):
        rounds, values = report.series(key)
        if rounds:
            ax.plot(rounds, values, style, marker="s", ms=4, color="black", lw=1.5, label=label)
            drawn = True
    _round_axis(ax, f"loss per round — run {report.run_id} ({report.method})")
    ax.set_ylabel("loss")
    if drawn:
        ax.legend(fontsize="small", loc="best")
    else:
        _empty(ax, "loss")


def _plot_eval(ax: Axes, report: RunReport) -> None:
    xs, ys = report.series("eval_em")
    _round_axis(ax, f"eval exact match per round — run {report.run_id}")
    ax.set_ylabel("exact match")
    if xs:
        ax.plot(xs, ys, "-o", ms=4, color="C2")
        ax.set_ylim(0.0, max(1.0, *ys) * 1.02)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                f"{y:.3f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize="x-small",
            )
    else:
        _empty(ax, "evaluation")


def _plot_bytes(ax: Axes, report: RunReport, field: str, title: str) -> None:
    colors = _colors(report.agents)
    values: list[int] = []
    for agent in report.agents:
        pts = [(u.round, int(getattr(u, field))) for u in report.updates if u.agent_id == agent]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-o", ms=4, color=colors[agent], label=agent)
            values += ys
    _round_axis(ax, title)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    if not values:
        _empty(ax, "updates")
        return
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) >= 50 * min(positive):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    ax.legend(fontsize="small", loc="best")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def human_bytes(n: float) -> str:
    """``1234`` → ``"1.2 KB"`` (decimal units, as the round table prints them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# --- the page ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.text, th.text { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _cell(value: Any, spec: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "–"


def _when(ts: float | None) -> str:
    if ts is None:
        return "open"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def render_html(report: RunReport, images: dict[str, bytes]) -> str:
    """A self-contained page: ``images`` (name → PNG bytes) inline, a table per round and agent."""
    e = html.escape
    rows = []
    for r in report.rounds:
        m = r.metrics
        rows.append(
            f'<tr id="round-{r.round}"><th scope="row">{r.round}</th>'
            f"<td>{len(r.assigned)}</td><td>{_cell(m.get('agents'), '.0f')}</td>"
            f"<td>{report.rejected.get(r.round, 0)}</td>"
            f"<td>{_cell(m.get('train_loss'), '.4f')}</td>"
            f"<td>{_cell(m.get('eval_loss'), '.4f')}</td>"
            f"<td>{_cell(m.get('eval_em'), '.3f')}</td>"
            f"<td>{e(human_bytes(m['bytes_up_per_agent'])) if 'bytes_up_per_agent' in m else '–'}</td>"
            f"<td>{e(human_bytes(m['bytes_down_per_agent'])) if 'bytes_down_per_agent' in m else '–'}</td>"
            f"<td>{_cell(m.get('seconds'), '.1f')}</td>"
            f'<td class="text">{e(_when(r.committed_at))}</td></tr>'
        )
    updates = [
        f'<tr><th scope="row">{u.round}</th><td class="text">{e(u.agent_id)}</td>'
        f"<td>{u.num_examples}</td><td>{_cell(u.metrics.get('train_loss'), '.4f')}</td>"
        f"<td>{u.bytes_up}</td><td>{u.bytes_down}</td>"
        f'<td class="text"><code>{e(u.sha256[:16])}</code></td></tr>'
        for u in report.updates
    ]
    figures = "\n".join(
        f'<img alt="{e(name)} per round" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}">'
        for name, data in images.items()
    )
    title = f"edgefed run {e(report.run_id)} ({e(report.method)})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<p>{len(report.rounds)} rounds, {len(report.agents)} agents with accepted updates,
{sum(report.rejected.values())} rejected updates. Written {e(_when(time.time()))}.</p>
{figures}
<h2>Rounds</h2>
<table>
<tr><th>round</th><th>assigned</th><th>accepted</th><th>rejected</th><th>train loss</th>
<th>eval loss</th><th>eval EM</th><th>up/agent</th><th>down/agent</th><th>seconds</th>
<th class="text">committed</th></tr>
{chr(10).join(rows)}
</table>
<h2>Accepted updates</h2>
<table>
<tr><th>round</th><th class="text">agent</th><th>examples</th><th>train loss</th>
<th>bytes up</th><th>bytes down</th><th class="text">sha256</th></tr>
{chr(10).join(updates)}
</table>
</body></html>
"""
