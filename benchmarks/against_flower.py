"""The same federated LoRA round in edgefed and in Flower: round time, bytes, peak memory.

Run: ``python benchmarks/against_flower.py [--clients 2,8] [--rounds 3] [--quick]``. In one
invocation, for each client count, both systems move the same payload — a peft LoRA state of
SmolLM2-135M's shapes, r=8 on q,k,v,o (240 float32 tensors, 3.69 MB: fedit's default update) —
between one server and N clients on loopback, with no training (what is measured is the
system, not the model), every client connection going through a byte-counting TCP proxy
(``benchmarks/_tcp_count.py``):

- *edgefed*: ``edgefed-aggregator serve`` (its own process, fedit, insecure, the default upload
  flow control) and N client processes of ``benchmarks/_light_agents.py`` (one agent each:
  the real protocol — Hello, heartbeats, grants, Acks — answering each train task at once with
  the update). Round time: the ledger's round start (tasks assigned) to its commit (every
  update validated, fsynced, recorded and summed; the checkpoint written).
- *Flower*: ``benchmarks/flower_side.py`` (flwr in its own venv ``.venv-flower``: SuperLink,
  N SuperNodes, FedAvg ServerApp; the clients return fresh arrays of the same shapes). Round
  time: Flower's fit round, from the messages built to FedAvg done.

Bytes per round are everything through the proxy during the round (both directions);
peak memory: edgefed's aggregator process (VmHWM) and largest client process; Flower's server
process tree (SuperLink, SuperExec, ServerApp: the highest summed RSS seen) and largest client
tree (SuperNode, SuperExec, ClientApp).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _harness import aggregator_cmd, free_port, toml  # noqa: E402
from _tcp_count import CountingProxy  # noqa: E402
from aggregator_throughput import SHA, lora_workload  # noqa: E402

from aggregator.store.ledger import Ledger  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj"


class PeakMemory(threading.Thread):
    """The highest VmHWM (peak resident set) of each watched process, polled until stopped."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.pids: list[int] = []
        self.peak: dict[int, int] = {}
        self.stop = threading.Event()

    def watch(self, pid: int) -> None:
        self.pids.append(pid)

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in list(self.pids):
                try:
                    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), _vmhwm(p.pid))
                except psutil.Error:
                    continue
            self.stop.wait(self.every)


def _vmhwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def edgefed_side(clients: int, rounds: int, work: Path) -> dict[str, Any]:
    w = lora_workload(8, "qkvo")
    port = free_port()
    state = work / f"edgefed-{clients}"
    config = work / f"edgefed-{clients}.toml"
    config.write_text(toml({
        "server": {"bind": f"tcp://127.0.0.1:{port}", "state_dir": str(state),
                   "heartbeat_interval": 1.0, "liveness": 15},
        "security": {"insecure": True},
        "run": {"run_id": "vs-flower", "method": "fedit", "rounds": rounds, "min_agents": clients,
                "quorum": 1.0, "eval": False, "model_sha256": SHA, "round_deadline_s": 900.0},
        "method": w.method_cfg,
    }))  # fmt: skip
    memory = PeakMemory()
    memory.start()
    log = open(work / f"edgefed-{clients}.log", "wb")  # noqa: SIM115
    agg = subprocess.Popen([*aggregator_cmd(), "serve", "--exit-when-done", "--config", str(config)], stdout=log,
                           stderr=subprocess.STDOUT)  # fmt: skip
    memory.watch(agg.pid)
    with CountingProxy(("127.0.0.1", port), timeline=True) as proxy:
        agents = []
        for i in range(clients):
            cmd = [sys.executable, str(ROOT / "benchmarks" / "_light_agents.py"), "--endpoint",
                   f"tcp://127.0.0.1:{proxy.port}", "--first", str(i), "--count", "1"]  # fmt: skip
            agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
            memory.watch(agents[-1].pid)
        outs = [p.communicate(timeout=1800)[0] for p in agents]
        code = agg.wait(timeout=120)
        memory.stop.set()
        memory.join(2)
        log.close()
        if code != 0:
            raise SystemExit(f"edgefed aggregator exited {code}: see {log.name}")
        ledger = Ledger(state / "ledger.sqlite")
        rows = ledger.rounds("vs-flower")
        ledger.close()
        per_round = []
        for r in rows:
            assert r.committed_at is not None
            up, down = proxy.bytes_between(r.started_at, r.committed_at)
            per_round.append({"round": r.round, "round_s": r.committed_at - r.started_at,
                              "bytes_up": up, "bytes_down": down})  # fmt: skip
    acked = sum(json.loads(o.strip().splitlines()[-1])["updates_acked"] for o in outs)
    client_peaks = [memory.peak.get(p.pid, 0) for p in agents]
    # round 1 sends no global adapter down (agents start from the seeded initial one): compare
    # rounds >= 2, where a round carries the update up and the global down, as Flower's do
    steady = [r for r in per_round if r["round"] >= 2] or per_round
    return {
        "round_s": [r["round_s"] for r in steady],
        "bytes_per_round": statistics.median(r["bytes_up"] + r["bytes_down"] for r in steady),
        "server_peak_mb": memory.peak.get(agg.pid, 0) / 2**20,
        "client_peak_mb": max(client_peaks) / 2**20,
        "updates_acked": acked,
        "per_round": per_round,
    }


def flower_side(clients: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flower_side.py"), "--clients", str(clients),
           "--rounds", str(rounds), "--targets", TARGETS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"flower_side.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    mem = data["memory_mb"]
    return {
        "round_s": data["round_s"],
        "bytes_per_round": data["bytes_per_round_median"],
        "server_peak_mb": mem["server"]["tree_peak"],  # SuperLink, SuperExec, ServerApp
        "client_peak_mb": mem["client_max"]["tree_peak"],
        "ideal_bytes_per_round": data["ideal_bytes_per_round"],
        "flwr_version": data["flwr_version"],
        "raw": data,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="2,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-flower", action="store_true", help="edgefed only (no .venv-flower).")
    ap.add_argument("--quick", action="store_true", help="2 clients, 1 round, edgefed only (CI).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    # clients reconnecting while the server is gone at the end of a run are not news
    logging.getLogger("_tcp_count").setLevel(logging.ERROR)
    counts = [2] if args.quick else [int(c) for c in args.clients.split(",")]
    rounds = 1 if args.quick else args.rounds
    payload = sum(int(a.nbytes) for a in lora_workload(8, "qkvo").make_tensors(0).values())
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgefed-vs-flower-") as tmp:
        for n in counts:
            row: dict[str, Any] = {"clients": n, "payload_bytes": payload}
            row["edgefed"] = edgefed_side(n, rounds, Path(tmp))
            if not (args.skip_flower or args.quick):
                row["flower"] = flower_side(n, rounds)
            results.append(row)
    ideal = lambda n: 2 * n * payload  # noqa: E731
    print(f"payload {payload / 1e6:.2f} MB per client per direction; {rounds} rounds; loopback")
    print(f"{'clients':>7} {'system':<8} {'round s (median)':>16} {'MB/round':>9} {'x ideal':>7} "
          f"{'server peak MiB':>15} {'client peak MiB':>15}")  # fmt: skip
    for row in results:
        n = row["clients"]
        for name in ("edgefed", "flower"):
            if name not in row:
                continue
            r = row[name]
            print(f"{n:>7} {name:<8} {statistics.median(r['round_s']):>16.2f} "
                  f"{r['bytes_per_round'] / 1e6:>9.2f} {r['bytes_per_round'] / ideal(n):>7.3f} "
                  f"{r['server_peak_mb']:>15.1f} {r['client_peak_mb']:>15.1f}")  # fmt: skip
        if "flower" in row:
            e, f = row["edgefed"], row["flower"]
            print(f"{n:>7} {'ratio':<8} {'flower/edgefed round time':>16} "
                  f"{statistics.median(f['round_s']) / statistics.median(e['round_s']):.1f}x, "
                  f"bytes {f['bytes_per_round'] / e['bytes_per_round']:.3f}x, server memory "
                  f"{f['server_peak_mb'] / e['server_peak_mb']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
