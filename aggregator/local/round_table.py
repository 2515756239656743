"""The table ``edgefed-aggregator local`` prints: one row per round as rounds finish.

Each row has the round's agents, train and eval loss, eval Rouge-L and exact match, bytes up
and down per agent, the round's time (row 0: from the table's creation, so agents starting and
loading the model count), the method's own metrics, its side evaluation metrics (e.g.
FedBiOT's ``emulator_eval_loss``) and, when ``max_len`` cut examples, how many
(``truncated=N``, ``eval_truncated=N``); when agents report more than their bytes
(a method's notes), one line per agent follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from aggregator.engine.engine import RoundSummary


class RoundTable:
    """Prints one row per round as rounds finish."""

    HEADER = (
        f"{'round':>5} {'agents':>6} {'train loss':>10} {'eval loss':>9} {'Rouge-L':>7} {'eval EM':>7} "
        f"{'up/agent':>10} {'down/agent':>10} {'time s':>7}"
    )

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.rows: list[RoundSummary] = []
        self.clock = clock
        self.started = clock()
        """Row 0's time runs from here (agents starting, loading the model, the first eval)."""
        print(self.HEADER, file=out, flush=True)

    @staticmethod
    def _fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def __call__(self, s: RoundSummary) -> None:
        self.rows.append(s)
        up = _human(s.bytes_up) if s.round > 0 else "-"
        down = _human(s.bytes_down) if s.round > 0 else "-"
        seconds = s.seconds if s.round else self.clock() - self.started
        print(
            f"{s.round:>5} {s.agents if s.round else '-':>6} {self._fmt(s.train_loss, '.4f'):>10} "
            f"{self._fmt(s.eval_loss, '.4f'):>9} {self._fmt(s.eval_rouge_l, '.4f'):>7} "
            f"{self._fmt(s.eval_em, '.3f'):>7} "
            f"{up:>10} {down:>10} {seconds:>7.1f}"
            + "".join(f"  {k}={v:g}" for k, v in s.method.items() if k != "examples")
            + "".join(f"  {k}={v:.4f}" for k, v in s.eval_side.items())
            + _truncated("truncated", s.truncation)
            + _truncated("eval_truncated", s.eval_truncation),
            file=self.out,
            flush=True,
        )
        if any(set(row) - {"up", "down"} for row in s.per_agent.values()):
            for agent_id, row in s.per_agent.items():
                extra = "".join(f"  {k}={v}" for k, v in row.items() if k not in ("up", "down"))
                print(
                    f"{'':>5} {agent_id:>12}  up {_human(float(row.get('up', 0))):>9}  "
                    f"down {_human(float(row.get('down', 0))):>9}{extra}",
                    file=self.out,
                    flush=True,
                )


def _truncated(name: str, counts: dict[str, float]) -> str:
    """A note when ``max_len`` cut examples this round (the agents' logs say which task)."""
    cut = counts.get("truncated_examples", 0.0)
    if not cut:
        return ""
    return f"  {name}={cut:g} (max {counts.get('truncated_tokens_max', 0.0):g} tokens)"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
