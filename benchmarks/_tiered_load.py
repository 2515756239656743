"""The load harness's tiered variant: the same light agents behind regional tiers.

``python benchmarks/load_harness.py --agents 500 --regions 5`` starts an upstream aggregator
(``serve``), ``regions`` regional tiers (``edgefed-aggregator region``, each its own process)
and the light agents split evenly over the regions (one process of them per region). Each
region relays the upstream's fedit round to its agents and answers with their mean; the
upstream receives one update per region. Measured: the upstream's round time (assignment to
commit, which includes the regions' rounds), the upstream's and the largest region's peak
resident memory, the updates the upstream took in, and lost updates (sent by agents but in no
region's ledger).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import ROOT, PeakRss, aggregator_cmd, figures, free_port, ledger_figures, toml
from aggregator_throughput import SHA, lora_workload


def _server(port: int, state: Path, window: int) -> dict[str, Any]:
    return {"bind": f"tcp://127.0.0.1:{port}", "state_dir": str(state), "heartbeat_interval": 2.0,
            "liveness": 15, "upload_window": window}  # fmt: skip


def run_tiered(n: int, rounds: int, work: Path, regions: int, window: int) -> dict[str, Any]:
    """One run of ``n`` light agents behind ``regions`` regions; the figures as a dict."""
    w = lora_workload(8, "qkvo")
    update_bytes = len(w.make_blob(0, 1))
    run = {"method": "fedit", "eval": False, "model_sha256": SHA, "round_deadline_s": 900.0,
           "quorum": 1.0}  # fmt: skip
    up_port, up_state = free_port(), work / f"up-{n}-{regions}"
    (work / "up.toml").write_text(toml({
        "server": _server(up_port, up_state, window),
        "security": {"insecure": True, "regions": [f"region-{r}" for r in range(regions)]},
        "run": {"run_id": f"tiered-{n}", "rounds": rounds, "min_agents": regions, **run},
        "method": w.method_cfg,
    }))  # fmt: skip
    logs = [open(work / "up.log", "wb")]  # noqa: SIM115
    up = subprocess.Popen([*aggregator_cmd(), "serve", "--exit-when-done", "--config", str(work / "up.toml")],
                          stdout=logs[0], stderr=subprocess.STDOUT)  # fmt: skip
    up_rss = PeakRss(up.pid)
    up_rss.start()
    started = time.monotonic()
    sizes = [n // regions + (1 if i < n % regions else 0) for i in range(regions)]
    procs, peaks, agents = [], [], []
    for r, count in enumerate(sizes):
        port, name = free_port(), f"region-{r}"
        config = work / f"{name}.toml"
        config.write_text(toml({
            "server": _server(port, work / f"{name}-{n}", window),
            "security": {"insecure": True},
            "run": {"run_id": name, "min_agents": count, **run},
            "method": w.method_cfg,
            "upstream": {"endpoint": f"tcp://127.0.0.1:{up_port}", "id": name, "insecure": True,
                         "heartbeat_interval": 2.0, "liveness": 15},
        }))  # fmt: skip
        logs.append(open(work / f"{name}.log", "wb"))  # noqa: SIM115
        proc = subprocess.Popen([*aggregator_cmd(), "region", "--config", str(config)],
                                stdout=logs[-1], stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(proc)
        peaks.append(PeakRss(proc.pid))
        peaks[-1].start()
        cmd = [sys.executable, str(ROOT / "benchmarks" / "_light_agents.py"),
               "--endpoint", f"tcp://127.0.0.1:{port}", "--first", str(sum(sizes[:r])),
               "--count", str(count), "--workload", "lora"]  # fmt: skip
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    counts = [json.loads((p.communicate(timeout=3600)[0] or "{}").strip().splitlines()[-1])
              for p in agents]  # fmt: skip
    codes = [up.wait(timeout=300), *(p.wait(timeout=300) for p in procs)]
    up_rss.join(2)
    for peak in peaks:
        peak.join(2)
    for log in logs:
        log.close()
    if any(codes):
        raise SystemExit(f"exit codes {codes}; see the logs in {work}")
    times, up_recorded = ledger_figures(up_state / "ledger.sqlite", f"tiered-{n}")
    recorded = sum(
        ledger_figures(work / f"region-{r}-{n}" / "ledger.sqlite", f"region-{r}")[1]
        for r in range(regions)
    )
    return {
        **figures(n, rounds, window, update_bytes, times, counts, recorded),
        "regions": regions,
        "agg_peak_rss_mb": up_rss.peak / 2**20,
        "region_peak_rss_mb": max(p.peak for p in peaks) / 2**20,
        "upstream_updates": up_recorded,
        "wall_s": time.monotonic() - started,
    }
