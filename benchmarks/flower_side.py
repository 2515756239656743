"""Flower's half of the side-by-side round: FedAvg over a LoRA-shaped update, no training.

Run (from edgefed's venv): ``python benchmarks/flower_side.py [--clients N] [--rounds R]
[--quick]``. It creates (once) a separate virtual environment ``.venv-flower/`` in the repo
root with pinned ``flwr`` and ``numpy`` from PyPI, then deploys Flower for real on 127.0.0.1:
one ``flower-superlink --insecure`` and N ``flower-supernode --insecure`` processes, each
SuperNode reaching the Fleet API through :class:`~benchmarks._tcp_count.CountingProxy`, and
submits the app in ``benchmarks/flower_app/`` with ``flwr run``. Each ClientApp answers each
round with fixed float32 arrays named and shaped like a peft LoRA state dict (distinct per
client and round: Flower ships each distinct object once, by content hash); nothing trains, so
the figures are the system's own overhead.

Measured: per round, the ServerApp's timestamps (nodes sampled -> replies in -> averaged) and
the proxy's bytes in that window; peak RSS per process role, from ``/proc/<pid>/status``
``VmHWM`` polled over each process tree (SuperLink -> SuperExec -> ServerApp, SuperNode ->
SuperExec -> a fresh ClientApp per message), and the peak of each tree's summed RSS. With
``--count-internal`` the SuperExecs are started by this script (``--isolation process``) and
reach their Runtime APIs through proxies too, which counts the hops inside each host. Prints
one JSON object on stdout; progress goes to stderr.

This module holds the command line, the payload's shapes and the measurement; the venv and
the Flower processes are in ``benchmarks/_flower_cluster.py``, the memory polling in
``benchmarks/_proc_memory.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._flower_cluster import Cluster, ensure_venv, free_port
from benchmarks._proc_memory import MB
from benchmarks._tcp_count import CountingProxy

log = logging.getLogger("flower_side")

ROOT = Path(__file__).resolve().parents[1]

APP_DIR = ROOT / "benchmarks" / "flower_app"
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ",".join(MODULE_ORDER)


def lora_shapes(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    rank: int,
    targets: list[str],
    head_dim: int | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """peft's LoRA state-dict names and shapes for a LLaMA-like model, in peft's order.

    ``lora_A.weight`` is ``[rank, in]`` and ``lora_B.weight`` ``[out, rank]``; q/o span
    ``heads * head_dim``, k/v ``kv_heads * head_dim`` (``head_dim`` defaults to
    ``hidden // heads``).
    """
    unknown = sorted(set(targets) - set(MODULE_ORDER))
    if unknown:
        raise SystemExit(f"unknown target modules {unknown}; known: {list(MODULE_ORDER)}")
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    dims = {
        "q_proj": ("self_attn", hidden, q),
        "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", q, hidden),
        "gate_proj": ("mlp", hidden, intermediate),
        "up_proj": ("mlp", hidden, intermediate),
        "down_proj": ("mlp", intermediate, hidden),
    }
    out: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(layers):
        for module in MODULE_ORDER:
            if module not in targets:
                continue
            block, d_in, d_out = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            out.append((f"{prefix}.lora_A.weight", (rank, d_in)))
            out.append((f"{prefix}.lora_B.weight", (d_out, rank)))
    return out


def read_shapes_json(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """``{"tensors": [[name, [dims]], ...]}`` or ``{name: [dims], ...}``."""
    data = json.loads(path.read_text())
    pairs = data["tensors"] if isinstance(data, dict) and "tensors" in data else data.items()
    return [(str(name), tuple(int(d) for d in dims)) for name, dims in pairs]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2, help="SuperNodes (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="FedAvg rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="2 clients, 1 round, tiny shapes")
    p.add_argument("--shapes-json", type=Path, help="tensor names/shapes instead of the model")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=None, help="default hidden // heads")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-flower")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle traffic window before the run")
    p.add_argument("--poll-s", type=float, default=0.1, help="memory polling interval")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long")
    p.add_argument("--count-internal", action="store_true", help="also count in-host hops")
    p.add_argument("--keep-logs", type=Path, help="copy the Flower processes' logs here")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.idle_s = 2, 1, 0.0
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.rank = 4
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.shapes_json:
        shapes, source = read_shapes_json(args.shapes_json), str(args.shapes_json)
    else:
        shapes = lora_shapes(
            args.hidden,
            args.intermediate,
            args.layers,
            args.heads,
            args.kv_heads,
            args.rank,
            targets,
            args.head_dim,
        )
        source = (
            f"hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
            f"heads={args.heads} kv_heads={args.kv_heads} rank={args.rank} "
            f"targets={','.join(targets)}"
        )
    params = sum(_numel(s) for _, s in shapes)
    payload = {
        "source": source,
        "tensors": len(shapes),
        "params": params,
        "bytes_fp32": params * 4,
        "mb_fp32": round(params * 4 / MB, 3),
    }
    log.info(
        "payload: %d tensors, %d params, %.3f MB fp32 (%s)",
        len(shapes),
        params,
        params * 4 / MB,
        source,
    )
    bin_dir = ensure_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="flwrbench-") as tmp_name:
        tmp = Path(tmp_name)
        result = run_flower(args, shapes, bin_dir, tmp)
    result["payload"] = payload
    result["ideal_bytes_per_round"] = 2 * args.clients * params * 4
    print(json.dumps(result, indent=2))
    return 0


def run_flower(
    args: argparse.Namespace,
    shapes: list[tuple[str, tuple[int, ...]]],
    bin_dir: Path,
    tmp: Path,
) -> dict[str, Any]:
    shapes_file, out_file = tmp / "shapes.json", tmp / "rounds.json"
    shapes_file.write_text(json.dumps({"tensors": [[n, list(s)] for n, s in shapes]}))
    link_port = free_port()
    cluster = Cluster(bin_dir, tmp, count_internal=args.count_internal)
    t_begin, load_begin = time.time(), os.getloadavg()[0]
    try:
        cluster.start_superlink(link_port)
        with CountingProxy(target=("127.0.0.1", link_port), timeline=True) as fleet:
            for i in range(args.clients):
                cluster.start_supernode(i, fleet.port)
            cluster.wait_ready(args.clients, timeout=300.0)
            cluster.monitor.start(args.poll_s)
            t_ready = time.time()
            idle = _idle_window(fleet, args.idle_s)
            run_config = (
                f'shapes-file="{shapes_file}" out-file="{out_file}" '
                f"num-server-rounds={args.rounds} num-clients={args.clients}"
            )
            run_id = cluster.flwr_run(APP_DIR, run_config)
            t_submit = time.time()
            rounds = _wait_rounds(cluster, run_id, out_file, args.rounds, args.timeout_s)
            t_end, load_end = time.time(), os.getloadavg()[0]
            status = _wait_finished(cluster, run_id, timeout=60.0)
            cluster.monitor.stop()
            totals = fleet.snapshot()
            per_round = [_round_figures(r, fleet, cluster) for r in rounds]
            fleet_conns = fleet.connections
        internal = cluster.internal_bytes()
        memory = cluster.monitor.report()
    except BaseException:
        cluster.dump_logs(sys.stderr)
        raise
    finally:
        cluster.stop()
        if args.keep_logs:
            cluster.copy_logs(args.keep_logs)
    round_s = [r["round_s"] for r in per_round]
    up = [r["bytes_up"] for r in per_round]
    down = [r["bytes_down"] for r in per_round]
    return {
        "system": "flower",
        "flwr_version": cluster.flwr_version(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # the machine is shared: the 1-minute load average before and after the run
            "loadavg_1m": [round(load_begin, 2), round(load_end, 2)],
        },
        "clients": args.clients,
        "rounds": args.rounds,
        "round_s": round_s,
        "round_s_median": statistics.median(round_s),
        "bytes_up_per_round_median": int(statistics.median(up)),
        "bytes_down_per_round_median": int(statistics.median(down)),
        "bytes_per_round_median": int(
            statistics.median(u + d for u, d in zip(up, down, strict=True))
        ),
        "per_round": per_round,
        "fleet_total": {
            "bytes_up": totals.bytes_up,
            "bytes_down": totals.bytes_down,
            "connections": fleet_conns,
            "from_submit_s": round(t_end - t_submit, 3),
        },
        "idle_bytes_per_s": idle,
        "internal_bytes": internal,
        "flower_reported_traffic": status.get("network-traffic"),
        "run_status": status.get("status"),
        "memory_mb": memory,
        "startup_s": round(t_ready - t_begin, 3),
        "wall_s": round(t_end - t_begin, 3),
    }


def _idle_window(fleet: CountingProxy, seconds: float) -> dict[str, float] | None:
    """Polling traffic with every SuperNode connected and no run: bytes/s each way."""
    if seconds <= 0:
        return None
    before = fleet.snapshot()
    time.sleep(seconds)
    after = fleet.snapshot()
    dt = after.at - before.at
    return {
        "up": round((after.bytes_up - before.bytes_up) / dt, 1),
        "down": round((after.bytes_down - before.bytes_down) / dt, 1),
    }


def _wait_rounds(
    cluster: Cluster, run_id: str, out_file: Path, rounds: int, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.time() + timeout
    next_status = time.time() + 30.0
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError):  # absent yet, or caught mid-write
            data = json.loads(out_file.read_text())
            done = [r for r in data.get("rounds", []) if "aggregated" in r]
            if len(done) >= rounds:
                return done
        if time.time() >= next_status:
            status = str(cluster.run_status(run_id).get("status", ""))
            if status.startswith("finished"):
                raise SystemExit(f"Flower run {run_id} ended as {status} before {rounds} rounds")
            next_status = time.time() + 30.0
        cluster.check_alive()
        time.sleep(0.2)
    raise SystemExit(f"Flower run {run_id} did not finish {rounds} rounds in {timeout:.0f} s")


def _wait_finished(cluster: Cluster, run_id: str, timeout: float) -> dict[str, Any]:
    """The run's final status from ``flwr ls`` (Flower's own traffic figures come with it)."""
    deadline = time.time() + timeout
    while True:
        status = cluster.run_status(run_id)
        if str(status.get("status", "")).startswith("finished") or time.time() > deadline:
            return status
        time.sleep(2.0)


def _round_figures(r: dict[str, Any], fleet: CountingProxy, cluster: Cluster) -> dict[str, Any]:
    """One round: the ServerApp's timestamps, the Fleet bytes from its start to its average."""
    up, down = fleet.bytes_between(r["start"], r["aggregated"])
    internal = cluster.internal_between(r["start"], r["aggregated"])
    return {
        "round": r["round"],
        "round_s": round(r["aggregated"] - r["configured"], 3),
        "sample_s": round(r["configured"] - r["start"], 3),
        "replies_in_s": round(r["replies"] - r["configured"], 3),
        "aggregate_s": round(r["aggregated"] - r["replies"], 3),
        "replies_ok": r["ok"],
        "nodes": r["nodes"],
        "bytes_up": up,
        "bytes_down": down,
        "bytes_total": up + down,
        **({"internal": internal} if internal is not None else {}),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(f"{exc}\n{exc.stdout or ''}{exc.stderr or ''}\n")
        sys.exit(1)
