"""Errors a user causes on the agent side end in one clear message, never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq
import zmq.auth

from aggregator.local.workdir import write_agent_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_agent(
    tmp: Path, model_dir: Path, endpoint: str, security: dict[str, object], until: str
) -> str:
    """Run an agent until its output shows ``until`` (or 120 s pass), then SIGTERM it."""
    data = tmp / "data.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n' * 4, encoding="utf-8")
    cfg = tmp / "agent.toml"
    write_agent_config(cfg, {
        "agent": {"id": "edge-1", "aggregator": endpoint, "state_dir": str(tmp / "state"),
                  "model": str(model_dir), "data": str(data), "heartbeat_interval": 0.2,
                  "liveness": 2, "reconnect_min": 0.2, "reconnect_max": 0.5},
        "security": security,
    })  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 120
    while until not in "".join(lines) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    reader.join(timeout=30)
    proc.stdout.close()  # type: ignore[union-attr]
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    return out


def test_unreachable_aggregator_says_what_to_check(tmp_path: Path, tiny_model_dir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    out = run_agent(tmp_path, tiny_model_dir, endpoint, {"insecure": True}, "no answer")
    assert f"no answer from the aggregator at {endpoint}" in out
    assert "that it runs" in out


def test_wrong_server_key_says_what_to_check(tmp_path: Path, tiny_model_dir: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    server_pub, server_secret = zmq.auth.create_certificates(str(keys), "server")
    other_pub, _ = zmq.auth.create_certificates(str(keys), "other")
    zmq.auth.create_certificates(str(keys), "edge-1")
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)  # a CURVE server with another key than the agent expects
    public, secret = zmq.auth.load_certificate(server_secret)
    server.curve_secretkey = secret  # type: ignore[assignment]
    server.curve_publickey = public
    server.curve_server = True
    port = server.bind_to_random_port("tcp://127.0.0.1")
    try:
        out = run_agent(tmp_path, tiny_model_dir, f"tcp://127.0.0.1:{port}", {
            "secret_key": str(keys / "edge-1.key_secret"), "server_public_key": other_pub},
            "could not decrypt it")  # fmt: skip
    finally:
        server.close(linger=0)
        ctx.term()
    # the handshake's failure event says which key is wrong (not the generic hint)
    assert "CURVE handshake with" in out and "could not decrypt it" in out
    assert "security.server_public_key is the aggregator's public key" in out
