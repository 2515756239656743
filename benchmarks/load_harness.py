"""Many agents against one aggregator: round time, updates/s, aggregator peak memory, losses.

Run: ``python benchmarks/load_harness.py [--agents 10,100,500] [--rounds 2] [--workload lora]
[--regions 0,5] [--quick]``. For each size it starts the real aggregator
(``edgefed-aggregator serve``, its own process, loopback, insecure) and the agents as a few processes of lightweight agents
(``benchmarks/_light_agents.py``: one DEALER per agent speaking the real protocol, no training,
each train task answered at once with an update of the workload's real size and kind: fedit's
default LoRA of SmolLM2-135M, r=8 on q,k,v,o, 3.69 MB; or Ferret triples). It samples the
aggregator's resident memory every 50 ms, and afterwards reads the ledger: every round's time
from its start to its commit, the updates it recorded, and counts lost updates (sent by agents
but not in the ledger) — the number that must be zero.

Per size: ``round_s`` (mean over rounds, from assignment to commit: receiving, validating,
fsyncing, summing and checkpointing every update), ``updates_per_s`` (agents / round_s),
``agg_peak_rss_mb`` and the bytes of one update (``update_mb``); the aggregator's peak must not
grow with agents x update size (it aggregates into a running sum as updates arrive).

``--regions 0,5`` runs each size flat (0) and behind 5 regional tiers (``_tiered_load.py``), side
by side: the upstream's round time and peak memory, the largest region's, and the updates the
upstream takes in (one per region).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _harness import (  # noqa: E402
    PeakRss,
    aggregator_cmd,
    figures,
    free_port,
    ledger_figures,
    toml,
)
from aggregator_throughput import SHA, ferret_workload, lora_workload  # noqa: E402


def run_size(
    n: int, rounds: int, workload: str, procs: int, work: Path, window: int
) -> dict[str, Any]:
    state = work / f"state-{n}"
    ferret_dir = work / "ferret-model"
    w = lora_workload(8, "qkvo") if workload == "lora" else ferret_workload(ferret_dir)
    update_bytes = len(w.make_blob(0, 1))
    port = free_port()
    run: dict[str, Any] = {
        "run_id": f"load-{n}", "method": w.method, "rounds": rounds, "min_agents": n,
        "quorum": 1.0, "eval": False, "model_sha256": SHA, "round_deadline_s": 900.0,
    }  # fmt: skip
    if w.model_dir is not None:
        run["model_dir"] = str(w.model_dir)
    config = work / f"aggregator-{n}.toml"
    config.write_text(
        toml(
            {
                "server": {
                    "bind": f"tcp://127.0.0.1:{port}",
                    "state_dir": str(state),
                    "heartbeat_interval": 2.0,
                    "liveness": 15,
                    "upload_window": window,
                },
                "security": {"insecure": True},
                "run": run,
                "method": w.method_cfg,
            }
        )
    )
    log = open(work / f"aggregator-{n}.log", "wb")  # noqa: SIM115
    agg = subprocess.Popen([*aggregator_cmd(), "serve", "--exit-when-done", "--config", str(config)], stdout=log,
                           stderr=subprocess.STDOUT)  # fmt: skip
    rss = PeakRss(agg.pid)
    rss.start()
    started = time.monotonic()
    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    firsts = [sum(per[:i]) for i in range(procs)]
    agents = []
    for first, count in zip(firsts, per, strict=True):
        if count == 0:
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / "_light_agents.py"),
               "--endpoint", f"tcp://127.0.0.1:{port}", "--first", str(first),
               "--count", str(count), "--workload", workload]  # fmt: skip
        if workload == "ferret":
            cmd += ["--ferret-model", str(work / f"ferret-agents-{first}")]
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    counts = [json.loads((p.communicate(timeout=1800)[0] or "{}").strip().splitlines()[-1])
              for p in agents]  # fmt: skip
    code = agg.wait(timeout=120)
    rss.join(2)
    log.close()
    total = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"aggregator exited with {code}; see {work / f'aggregator-{n}.log'}")
    times, recorded = ledger_figures(state / "ledger.sqlite", f"load-{n}")
    return {
        **figures(n, rounds, window, update_bytes, times, counts, recorded),
        "agg_peak_rss_mb": rss.peak / 2**20,
        "wall_s": total,
    }


def line(r: dict[str, Any]) -> str:
    tier = f"{r['regions']} regions" if r.get("regions") else "flat"
    region = (
        f"  largest region peak RSS {r['region_peak_rss_mb']:7.1f} MiB"
        f"  upstream took {r['upstream_updates']} updates"
        if r.get("regions")
        else ""
    )
    return (
        f"{r['agents']:>5} agents  {tier:<10}  window {r['upload_window']:>3}  "
        f"{r['rounds']} rounds  update {r['update_mb']:.3f} MB  round {r['round_s']:7.2f} s  "
        f"{r['updates_per_s']:6.1f} updates/s  aggregator peak RSS {r['agg_peak_rss_mb']:7.1f} MiB"
        f"{region}  sent {r['updates_sent']} recorded {r['updates_recorded']} lost {r['lost']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="10,100,500")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workload", choices=["lora", "ferret"], default="lora")
    ap.add_argument("--procs", type=int, default=4, help="Processes the agents are spread over.")
    ap.add_argument(
        "--quick", action="store_true", help="10 agents, 1 round, flat and 2 regions (CI)."
    )
    ap.add_argument(
        "--windows",
        default="8",
        help="server.upload_window values to compare, e.g. 8,0 (0: no upload flow control).",
    )
    ap.add_argument(
        "--regions",
        default="0",
        help="Regional tiers to put the agents behind, e.g. 0,5 (0: flat; lora workload only).",
    )
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()
    sizes = [10] if args.quick else [int(x) for x in args.agents.split(",")]
    rounds = 1 if args.quick else args.rounds
    windows = [int(x) for x in args.windows.split(",")]
    tiers = [0, 2] if args.quick else [int(x) for x in args.regions.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefed-load-") as tmp:
        for n in sizes:
            for window in windows:
                for regions in tiers:
                    work = Path(tmp) / f"w{window}-r{regions}-{n}"
                    work.mkdir(exist_ok=True)
                    if regions:
                        from _tiered_load import run_tiered

                        r = run_tiered(n, rounds, work, regions, window)
                    else:
                        r = run_size(n, rounds, args.workload, min(args.procs, n), work, window)
                    results.append(r)
                    print(line(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["lost"] or r["updates_recorded"] != r["expected"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
