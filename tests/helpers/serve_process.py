"""A real ``edgefed-aggregator serve`` process with CURVE keys, and raw agents to attack it.

The aggregator runs as ``python -m aggregator serve`` (this worktree's code first on the path);
clients are plain DEALER sockets holding the keys :func:`aggregator.local.run.make_keys` wrote, so a
test can send any frames it likes, as an allowed agent or as another one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from aggregator.local.workdir import make_keys
from protocol.frames import decode, encode
from protocol.messages import Hello, Message, Profile

SHA = "ef" * 32
PROFILE = Profile(hostname="h", os="Linux", python="3.11", torch="2.13", cpus=2,
                  ram_total=1 << 30, ram_available=1 << 30, disk_free=1 << 30)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_text(raw: dict[str, Any]) -> str:
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict))
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}", v)

    for section, table in raw.items():
        emit(section, table)
    return "\n".join(lines) + "\n"


def hello_frames(agent_id: str) -> list[bytes]:
    msg = Hello(agent_id=agent_id, versions=[1], profile=PROFILE, models=[SHA])
    return [bytes(f) for f in encode(msg)]


class Served:
    """Keys for ``agents``, a config, and the serve process (``start`` / ``stop``)."""

    def __init__(self, work: Path, agents: list[str], **run: Any) -> None:
        self.work = work
        self.keys = make_keys(work, agents)
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.raw: dict[str, Any] = {
            "server": {"bind": self.endpoint, "state_dir": str(work / "state"),
                       "heartbeat_interval": 0.5, "liveness": 6},
            "security": {"secret_key": str(self.keys["server_secret"]),
                         "allow_dir": str(self.keys["allow"])},
            "run": {"run_id": "hostile", "model_sha256": SHA, "min_agents": 50, "eval": False,
                    **run},
            "method": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}},
        }  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "aggregator.log"
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        config = self.work / "aggregator.toml"
        config.write_text(toml_text(self.raw), encoding="utf-8")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
        deadline = time.monotonic() + 60
        while "aggregator listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{self.logs()}")
            time.sleep(0.1)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def client(self, key: str, routing_id: str | None = None) -> zmq.Socket[bytes]:
        """A DEALER holding ``key``'s secret key, connected as ``routing_id`` (default: key)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, (routing_id or key).encode())
        sock.setsockopt(zmq.LINGER, 0)
        public, secret = zmq.auth.load_certificate(self.keys["dir"] / f"{key}.key_secret")
        sock.curve_publickey = public
        sock.curve_secretkey = secret  # type: ignore[assignment]
        sock.curve_serverkey = zmq.auth.load_certificate(self.keys["server_public"])[0]
        sock.connect(self.endpoint)
        self.sockets.append(sock)
        return sock

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def receive(sock: zmq.Socket[bytes], timeout_s: float) -> Message | None:
    """The next message's header, or None after ``timeout_s``."""
    if sock.poll(int(timeout_s * 1000)):
        return decode(sock.recv_multipart()).header
    return None


def receive_type(sock: zmq.Socket[bytes], kind: type, timeout_s: float) -> Any:
    """The next message of type ``kind`` within ``timeout_s`` (others are skipped), or None."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = receive(sock, left)
        if isinstance(msg, kind):
            return msg
    return None
