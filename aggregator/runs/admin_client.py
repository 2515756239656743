"""The client end of the admin channel (:mod:`aggregator.runs.admin`): where the socket of a state
dir is, and one request/reply. Imports nothing heavy, so ``runs list`` starts fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zmq

from aggregator.errors import AggregatorError

SOCKET = Path("admin") / "admin.sock"
MAX_IPC_PATH = 107
"""Longest Unix socket path the kernel takes (``sun_path`` less its terminating NUL)."""


def admin_path(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / SOCKET


def call(state_dir: Path, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request to the service of ``state_dir``; its reply. An
    :class:`AggregatorError` when no service answers."""
    path = admin_path(state_dir)
    if not path.exists():
        raise AggregatorError(
            f"no aggregator serves {state_dir} (no {path}); start `edgefed-aggregator serve`"
        )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{path}")
        sock.send(json.dumps(request).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise AggregatorError(f"the aggregator at {path} did not answer within {timeout_s:g} s")
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close(0)
