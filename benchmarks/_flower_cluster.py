"""The Flower deployment of the side-by-side benchmark: its venv and its processes on loopback.

:func:`ensure_venv` creates (once) the separate virtual environment with the pinned ``flwr``;
:class:`Cluster` starts one ``flower-superlink`` and N ``flower-supernode`` processes (and, to
count the in-host hops, their SuperExecs behind :class:`~benchmarks._tcp_count.CountingProxy`),
drives the ``flwr`` CLI, watches the process trees' memory with
:class:`~benchmarks._proc_memory.Monitor`, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks._proc_memory import Monitor, process_tree, status_kb
from benchmarks._tcp_count import CountingProxy

log = logging.getLogger(__name__)

# What the Flower venv gets: flwr 1.42 needs a newer certifi than the registry here serves.
FLWR_PINS = ("flwr==1.41.0", "numpy==2.4.6")


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


def wait_port(port: int, timeout: float) -> None:
    """Block until something accepts on 127.0.0.1:``port``; SystemExit after ``timeout`` s."""
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
        wait_port(port, timeout=120.0)
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
            wait_port(runtime_port, timeout=120.0)
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
        tree = process_tree(list(pids))
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
            if pid not in pids and status_kb(pid) is not None:
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
