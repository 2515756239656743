"""The scoreboard's arithmetic and its resumability (its --quick run is in test_benchmarks)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scoreboard  # noqa: E402
from _scoreboard_runs import Common, Config, Store  # noqa: E402
from _scoreboard_stats import simulated_round_seconds, stat, summary_table, verdict  # noqa: E402


def test_the_simulated_round_is_the_slowest_agent_with_its_transfer() -> None:
    agents = {
        "agent-1": {"seconds": 10.0, "bytes_up": 5e6, "bytes_down": 5e6},  # 10 MB at 100 Mbit/s
        "agent-2": {"seconds": 4.0, "bytes_up": 2.5e6, "bytes_down": 0.0},  # 2.5 MB at 2 Mbit/s
    }
    bw = {"agent-1": 100.0, "agent-2": 2.0}
    # agent-1: 10 + 0.8 s; agent-2: 4 + 10 s
    assert simulated_round_seconds(agents, bw) == pytest.approx(14.0)
    assert simulated_round_seconds(agents, {"agent-1": 100.0, "agent-2": 100.0}) == pytest.approx(
        10.8
    )


def test_mean_sd_and_verdicts() -> None:
    s = stat([0.30, 0.34, 0.32])
    assert s.mean == pytest.approx(0.32) and s.sd == pytest.approx(0.02) and s.n == 3
    assert s.cell(".2f") == "0.32 ± 0.02"
    assert stat([0.5]).sd is None and stat([math.nan]).n == 0
    close = stat([0.33, 0.35, 0.31])  # gap 0.01 < spread 0.02
    far = stat([0.40, 0.41, 0.42])  # gap 0.09 > spread
    assert verdict(close, s) == "no difference"
    assert verdict(far, s) == "better" and verdict(s, far) == "worse"
    assert verdict(far, s, higher_is_better=False) == "worse"
    assert verdict(stat([0.9]), s) == "not judged (n < 2)"


def _result(method: str, seed: int, rouge: float, group: str | None = None) -> dict[str, Any]:
    rows = [
        {"round": 0, "eval_rouge_l": 0.1, "eval_loss": 3.0, "cum_bytes": 0.0, "sim_seconds": 0.0},
        {"round": 1, "eval_rouge_l": rouge, "eval_loss": 2.0, "eval_em": 0.25,
         "cum_bytes": 2e6, "sim_seconds": 12.0},
    ]  # fmt: skip
    return {"method": method, "seed": seed, "group": group or method, "rows": rows}


def test_the_table_gives_mean_sd_n_and_the_verdict_against_the_reference() -> None:
    results = [_result("fedavg", s, r) for s, r in enumerate((0.30, 0.34, 0.32))]
    results += [_result("fedit", s, r) for s, r in enumerate((0.33, 0.35, 0.31))]
    results += [_result("ferret", s, r) for s, r in enumerate((0.10, 0.11, 0.12))]
    lines = summary_table(results, "fedavg")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines[2:]}
    assert rows["fedit"] == (
        "| fedit | 3 | 0.1000 ± 0.0000 | 0.3300 ± 0.0200 | 2.0000 ± 0.0000 | 0.250 ± 0.000 "
        "| 2.0 ± 0.0 | 12 ± 0 | no difference |"
    )
    assert rows["ferret"].endswith("| worse |") and rows["fedavg"].endswith("| — |")
    assert [ln.split(" | ")[0].strip("| ") for ln in lines[2:]] == ["fedit", "fedavg", "ferret"]


def test_finished_configurations_are_skipped_on_the_next_invocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    failed: list[str] = []

    def fake_run(cfg: Config, common: Common, split: Path, work: Path) -> dict[str, Any]:
        calls.append(cfg.name)
        if cfg.name == "fedit-nf4-lr0.003-s0" and not failed:
            failed.append(cfg.name)
            raise RuntimeError("interrupted")  # a run that dies is retried next time
        rouge = 0.3 if cfg.lr == 0.001 else 0.2
        return _result(cfg.method, cfg.seed, rouge, cfg.group) | {"name": cfg.name, "lr": cfg.lr,
                                                                   "quant": cfg.quant, "wall_seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(scoreboard, "run_config", fake_run)
    monkeypatch.setattr(scoreboard, "prepare_split", lambda args, seed: tmp_path)
    args = argparse.Namespace(
        results=tmp_path, lr_grid="fedit=1e-3,3e-3", methods="fedit", references="",
        seeds="0,1,2", quant="nf4", lr=1e-3, ferret_lr=0.05, fedavg_lr=0.01,
    )  # fmt: skip
    common = Common("m", 2, 1, 1, 2, (100.0, 20.0))
    store = Store(tmp_path / "results")
    assert scoreboard.run_all(args, common, store) == {"fedit": 0.001}
    assert calls == ["fedit-nf4-lr0.001-s0", "fedit-nf4-lr0.003-s0", "fedit-nf4-lr0.001-s1",
                     "fedit-nf4-lr0.001-s2"]  # fmt: skip
    calls.clear()
    assert scoreboard.run_all(args, common, store) == {"fedit": 0.001}
    assert calls == ["fedit-nf4-lr0.003-s0"]  # only the one that failed runs again
    assert len(store.load_all()) == 4
    calls.clear()
    scoreboard.run_all(args, common, store)
    assert calls == []
