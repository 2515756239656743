"""What the load harness and its tiered variant share: ports, configs, memory samples, figures.

``load_harness.py`` (flat) and ``_tiered_load.py`` (behind regional tiers) both start the real
aggregator by command, write its TOML config, sample its resident memory and turn the ledger's
round times and the light agents' counts into one row of figures.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.store.ledger import Ledger  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aggregator_cmd() -> list[str]:
    script = Path(sys.executable).with_name("edgefed-aggregator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "aggregator"]


def toml(values: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, items in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in items.items() if not isinstance(v, dict)]
        for sub, inner in items.items():
            if isinstance(inner, dict):
                lines.append(f"[{section}.{sub}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in inner.items()]
    return "\n".join(lines) + "\n"


class PeakRss(threading.Thread):
    """Samples a process's resident memory until it exits."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0

    def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.every)


def ledger_figures(db: Path, run_id: str) -> tuple[list[float], int]:
    """A run's committed round times (start to commit) and the updates its ledger recorded."""
    ledger = Ledger(db)
    rows = ledger.rounds(run_id)
    recorded = sum(len(ledger.updates(run_id, r.round)) for r in rows)
    ledger.close()
    return [r.committed_at - r.started_at for r in rows if r.committed_at is not None], recorded


def figures(
    n: int,
    rounds: int,
    window: int,
    update_bytes: int,
    times: list[float],
    counts: list[dict[str, Any]],
    recorded: int,
) -> dict[str, Any]:
    """The row both harness variants report: rates from round times, losses from counts."""
    sent = sum(c.get("updates_sent", 0) for c in counts)
    round_s = sum(times) / max(len(times), 1)
    return {
        "agents": n,
        "upload_window": window,
        "rounds": len(times),
        "update_mb": update_bytes / 1e6,
        "round_s": round_s,
        "updates_per_s": n / round_s if round_s else 0.0,
        "updates_sent": sent,
        "updates_recorded": recorded,
        "updates_acked": sum(c.get("updates_acked", 0) for c in counts),
        "lost": sent - recorded,
        "expected": n * rounds,
        "agent_errors": [e for c in counts for e in c.get("errors", [])][:5],
    }
