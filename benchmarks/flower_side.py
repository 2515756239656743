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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._tcp_count import CountingProxy

log = logging.getLogger("flower_side")

ROOT = Path(__file__).resolve().parents[1]

APP_DIR = ROOT / "benchmarks" / "flower_app"
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ",".join(MODULE_ORDER)
MB = 1e6
# What the Flower venv gets: flwr 1.42 needs a newer certifi than the registry here serves.
FLWR_PINS = ("flwr==1.41.0", "numpy==2.4.6")


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


# -- the Flower venv and processes --------------------------------------------------------


def ensure_venv(venv: Path) -> Path:
    """Create ``venv`` with :data:`FLWR_PINS` unless it already holds them; returns its bin/."""
    stamp = venv / ".flwrbench-pins"
    want = "\n".join(FLWR_PINS)
    if stamp.exists() and stamp.read_text() == want and (venv / "bin" / "flwr").exists():
        return venv / "bin"
    log.info("creating %s with %s (once)", venv, " ".join(FLWR_PINS))
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    proc = subprocess.run([*pip, *FLWR_PINS], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pip install {' '.join(FLWR_PINS)} failed:\n{proc.stdout}{proc.stderr}")
    stamp.write_text(want)
    return venv / "bin"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class _Proc:
    name: str
    group: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Monitor:
    """Polls the process trees under the roots: peak VmHWM per process, peak summed RSS per tree."""

    roots: dict[str, list[int]] = field(default_factory=dict)  # group -> root pids
    hwm_kb: dict[int, int] = field(default_factory=dict)
    role: dict[int, tuple[str, str]] = field(default_factory=dict)  # pid -> (group, role)
    tree_peak_kb: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, interval: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(interval)

    def poll(self) -> None:
        for group, roots in self.roots.items():
            total = 0
            for pid in _tree(roots):
                status = _status_kb(pid)
                if status is None:
                    continue
                rss, hwm = status
                total += rss
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
                if pid not in self.role:
                    self.role[pid] = (group, _role(pid))
            self.tree_peak_kb[group] = max(self.tree_peak_kb.get(group, 0), total)

    def report(self) -> dict[str, Any]:
        """Peaks in MB: the server's roles, the clients' roles (max over clients), per client."""
        per_group: dict[str, dict[str, Any]] = {}
        for pid, (group, role) in self.role.items():
            g = per_group.setdefault(group, {"processes": {}})
            g[role] = max(g.get(role, 0.0), self.hwm_kb.get(pid, 0) * 1024 / MB)
            g["processes"][role] = g["processes"].get(role, 0) + 1
        for group, g in per_group.items():
            g["tree_peak"] = self.tree_peak_kb.get(group, 0) * 1024 / MB
        clients = [g for name, g in sorted(per_group.items()) if name != "server"]
        roles = sorted({k for g in clients for k in g if k != "processes"})
        return _rounded(
            {
                "server": per_group.get("server", {}),
                "client_max": {r: max(g.get(r, 0.0) for g in clients) for r in roles},
                "client_tree_peaks": [g.get("tree_peak", 0.0) for g in clients],
                "client_processes": clients[0]["processes"] if clients else {},
            }
        )


def _tree(roots: list[int]) -> list[int]:
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None for a process gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmHWM" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "unknown"
    for arg in argv:
        base = os.path.basename(arg.decode(errors="replace"))
        if base.startswith(("flower-", "flwr-")):
            return base.removeprefix("flower-").removeprefix("flwr-")
    return "other"  # a helper some Flower process started for a moment


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


class Cluster:
    """The Flower processes of one benchmark run, their homes, logs and (optional) proxies."""

    def __init__(self, bin_dir: Path, tmp: Path, *, count_internal: bool) -> None:
        self.bin = bin_dir
        self.tmp = tmp
        self.count_internal = count_internal
        self.procs: list[_Proc] = []
        self.monitor = Monitor()
        self.internal: dict[str, list[CountingProxy]] = {"server": [], "nodes": []}
        (tmp / "logs").mkdir()
        self.server_home = tmp / "home-server"

    def _env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        home.mkdir(exist_ok=True)
        return env

    def _spawn(self, name: str, group: str, argv: list[str], home: Path) -> None:
        log_path = self.tmp / "logs" / f"{name}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                [str(self.bin / argv[0]), *argv[1:]],
                env=self._env(home),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
            )
        self.procs.append(_Proc(name, group, popen, log_path))
        self.monitor.roots.setdefault(group, []).append(popen.pid)

    def _superexec(self, name: str, group: str, runtime_port: int, home: Path) -> None:
        proxy = CountingProxy(target=("127.0.0.1", runtime_port), timeline=True).start()
        self.internal["server" if group == "server" else "nodes"].append(proxy)
        address = f"127.0.0.1:{proxy.port}"
        self._spawn(
            name, group, ["flower-superexec", "--insecure", "--runtime-api-address", address], home
        )

    def start_superlink(self, port: int) -> None:
        self.server_home.mkdir(exist_ok=True)
        (self.server_home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        argv = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation"]
        argv += ["--port", str(port)]
        if self.count_internal:
            argv += ["--isolation", "process"]
        self._spawn("superlink", "server", argv, self.server_home)
        _wait_port(port, timeout=120.0)
        if self.count_internal:
            self._superexec("superlink-superexec", "server", port, self.server_home)

    def start_supernode(self, index: int, fleet_port: int) -> None:
        home, runtime_port = self.tmp / f"home-node{index}", free_port()
        argv = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{fleet_port}"]
        argv += ["--port", str(runtime_port)]
        if self.count_internal:
            argv += ["--isolation", "process"]
        group = f"client{index:02d}"
        self._spawn(f"supernode{index}", group, argv, home)
        if self.count_internal:
            _wait_port(runtime_port, timeout=120.0)
            self._superexec(f"supernode{index}-superexec", group, runtime_port, home)

    def wait_ready(self, clients: int, timeout: float) -> None:
        """Every SuperNode is registered: the SuperLink logs ``[Fleet.ActivateNode]`` per node."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            text = (self.tmp / "logs" / "superlink.log").read_text(errors="replace")
            if text.count("[Fleet.ActivateNode] Activated") >= clients:
                time.sleep(2.0)
                return
            time.sleep(0.5)
        raise SystemExit(f"{clients} SuperNodes did not register in {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        """Run the ``flwr`` CLI with ``--format json`` against the bench SuperLink."""
        proc = subprocess.run(
            [str(self.bin / "flwr"), *args, "--format", "json"],
            env=self._env(self.server_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        out = proc.stdout
        try:
            data: dict[str, Any] = json.loads(out[out.index("{") :])
        except ValueError:
            data = {}
        if proc.returncode != 0 or not data.get("success"):
            raise SystemExit(
                f"flwr {' '.join(args)} failed ({proc.returncode}): {out}{proc.stderr}"
            )
        return data

    def flwr_run(self, app_dir: Path, run_config: str) -> str:
        return str(self.flwr("run", str(app_dir), "bench", "--run-config", run_config)["run-id"])

    def run_status(self, run_id: str) -> dict[str, Any]:
        runs = self.flwr("ls", "bench", "--run-id", run_id).get("runs") or [{}]
        return dict(runs[0])

    def flwr_version(self) -> str:
        return (self.bin.parent / ".flwrbench-pins").read_text().split()[0].split("==")[1]

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise SystemExit(f"{p.name} exited with {p.popen.returncode}; log: {p.log_path}")

    def internal_bytes(self) -> dict[str, dict[str, int]] | None:
        """Totals through the Runtime-API proxies (``--count-internal``), else None."""
        if not self.count_internal:
            return None
        return {
            side: {
                "bytes_up": sum(p.bytes_up for p in proxies),
                "bytes_down": sum(p.bytes_down for p in proxies),
            }
            for side, proxies in self.internal.items()
        }

    def internal_between(self, start: float, end: float) -> dict[str, int] | None:
        if not self.count_internal:
            return None
        out: dict[str, int] = {}
        for side, proxies in self.internal.items():
            windows = [p.bytes_between(start, end) for p in proxies]
            out[f"{side}_up"] = sum(w[0] for w in windows)
            out[f"{side}_down"] = sum(w[1] for w in windows)
        return out

    def stop(self) -> None:
        """SIGTERM the processes we started (SuperNodes first), then SIGKILL stragglers by pid."""
        self.monitor.stop()
        pids = {p.popen.pid: p for p in self.procs}
        tree = _tree(list(pids))
        for p in sorted(self.procs, key=lambda p: p.group == "server"):
            if p.popen.poll() is None:
                p.popen.terminate()
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        for pid in tree:
            if pid not in pids and _status_kb(pid) is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
        for proxies in self.internal.values():
            for proxy in proxies:
                proxy.close()

    def dump_logs(self, stream: IO[str], lines: int = 25) -> None:
        for p in self.procs:
            tail = p.log_path.read_text(errors="replace").splitlines()[-lines:]
            stream.write(f"--- {p.name} ({p.log_path.name}) ---\n" + "\n".join(tail) + "\n")

    def copy_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for path in (self.tmp / "logs").glob("*.log"):
            shutil.copy(path, dest / path.name)


# -- the benchmark ------------------------------------------------------------------------


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
