"""A federation on loopback for integration tests: demo data, CURVE keys, agent configs and agent
processes (``python -m edge_agent run``) on a tiny model, plus the aggregator as a ``serve``
process where a test needs to kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.local.workdir import make_keys, write_agent_config
from aggregator.store.ledger import Ledger
from aggregator.store.modelhash import weights_sha256

FAST = {"heartbeat_interval": 0.25, "liveness": 12}


def method_params() -> dict[str, Any]:
    return {
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 2, "lr": 5e-3, "max_len": 64},
        "eval": {"max_examples": 6, "max_new_tokens": 4, "batch_size": 6},
    }


class Federation:
    """Data, keys and configs for one aggregator and N agents in a work dir."""

    def __init__(
        self, work: Path, model_dir: Path, agents: int, *, rounds: int, eval: bool
    ) -> None:
        self.work = work
        self.model_dir = model_dir
        self.sha = weights_sha256(model_dir)
        self.agent_ids = [f"edge-{i + 1}" for i in range(agents)]
        split = make_demo_split(agents, per_agent=16, n_eval=12, n_public=8, seed=1)
        self.files = write_demo(work / "data", split)
        self.keys = make_keys(work, self.agent_ids)
        self.raw: dict[str, Any] = {
            "server": {
                "bind": "tcp://127.0.0.1:0",
                "state_dir": str(work / "state"),
                "keep_updates": True,  # the test recomputes FedAvg from the stored updates
                **FAST,
            },
            "security": {
                "secret_key": str(self.keys["server_secret"]),
                "allow_dir": str(self.keys["allow"]),
            },
            "run": {
                "run_id": "it",
                "rounds": rounds,
                "min_agents": agents,
                "model": str(model_dir),
                "model_sha256": self.sha,
                "quant": "fp32",
                "eval": eval,
                "eval_initial": False,
                "round_deadline_s": 120.0,
            },
            "method": method_params(),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def agent_config(self, agent_id: str, endpoint: str) -> Path:
        i = self.agent_ids.index(agent_id)
        path = self.work / f"{agent_id}.toml"
        write_agent_config(
            path,
            {
                "agent": {
                    "id": agent_id,
                    "aggregator": endpoint,
                    "state_dir": str(self.work / agent_id),
                    "model": str(self.model_dir),
                    "data": str(self.files[f"agent-{i}"]),
                    "eval_data": str(self.files["eval"]),
                    "threads": 1,
                    "reconnect_min": 0.2,
                    "reconnect_max": 1.0,
                    **FAST,
                },
                "security": {
                    "secret_key": str(self.keys["dir"] / f"{agent_id}.key_secret"),
                    "server_public_key": str(self.keys["server_public"]),
                },
            },
        )
        return path

    def start_agent(self, agent_id: str, endpoint: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{agent_id}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "run",
                "--config",
                str(self.agent_config(agent_id, endpoint)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        log.close()
        self.procs[agent_id] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.work.glob("*.log")
        )


def wait_for(predicate: Any, timeout: float, what: str, fed: Federation | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{fed.logs() if fed else ''}")


def ledger_of(fed: Federation) -> Ledger:
    return Ledger(fed.work / "state" / "ledger.sqlite")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_text(raw: dict[str, Any]) -> str:
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {json.dumps(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}", v)

    for section, table in raw.items():
        emit(section, table)
    return "\n".join(lines) + "\n"


def serve(
    config: Path, log: Path, env: dict[str, str] | None = None, *args: str
) -> subprocess.Popen[bytes]:
    """``edgefed-aggregator serve --config CONFIG`` as its own process, output appended to
    ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--config", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM ``proc`` (if it still runs) and wait for its exit code; SIGKILL it after
    ``timeout`` seconds and fail."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.pid} ignored SIGTERM for {timeout} s") from None
