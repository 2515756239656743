"""The admin channel of a serving aggregator: ``edgefed-aggregator runs submit | list | stop |
show`` talk to ``serve`` over it.

Transport: a ZeroMQ REP socket on a Unix socket, ``<state_dir>/admin/admin.sock``, in a folder
of mode 0700 with the socket itself chmod 0600. Only the service's own user (and root) can
connect; it is not on the agents' endpoint, and no agent key opens it. Requests and replies
are one JSON frame each (at most :data:`MAX_REQUEST` bytes in)::

    {"op": "submit", "toml": "<the run file>", "source": "run2.toml", "base": "/abs/dir"}
    {"op": "list"}                {"op": "stop", "run_id": "r2"}     {"op": "show", "run_id": "r2"}

and the reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "one clear message"}``. The
service answers on its loop thread, between messages of agents, so a request never races the
round engine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from aggregator.engine.engine import Outgoing
from aggregator.errors import AggregatorError, ConfigError
from aggregator.ops.config import AggregatorConfig
from aggregator.runs.admin_client import MAX_IPC_PATH, admin_path
from aggregator.runs.lifecycle import Lifecycle, doing_of
from aggregator.runs.state import SERVICE, submitted_config

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20


class AdminServer:
    """The REP socket; :meth:`serve_one` answers one request with ``handle``."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        state_dir: Path,
        handle: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> None:
        self.handle = handle
        path = admin_path(state_dir)
        if len(str(path)) > MAX_IPC_PATH:
            raise ConfigError(
                f"{path}: too long for a Unix socket ({len(str(path))} > {MAX_IPC_PATH} bytes); "
                "use a shorter server.state_dir"
            )
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        path.unlink(missing_ok=True)  # left by a killed service; the state dir is ours
        self.path = path
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST)
        old = os.umask(0o177)
        try:
            self.socket.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        log.info("admin socket %s (mode 0600)", path)

    def serve_one(self) -> None:
        try:
            data = self.socket.recv(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            reply = self.handle(request)
        except (ValueError, UnicodeDecodeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except AggregatorError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # the admin boundary: a bug answers, the service goes on
            log.exception("admin request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        self.socket.send(json.dumps(reply, default=str).encode())

    def close(self) -> None:
        self.socket.close(0)
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # a state dir gone read-only: the socket file stays behind
            log.warning("could not remove %s: %s", self.path, exc)


KNOWN = "submit, list, stop, resume, show"


def admin_request(
    lifecycle: Lifecycle, service: AggregatorConfig, request: dict[str, Any]
) -> tuple[list[Outgoing], dict[str, Any]]:
    """What to send to agents, and the reply, for one admin request."""
    book = lifecycle.book
    op = request.get("op")
    if op == "submit":
        base = request.get("base")
        config = submitted_config(
            service,
            str(request.get("toml", "")),
            str(request.get("source", "run file")),
            Path(base) if isinstance(base, str) else None,
        )
        run_id = book.submit(config)
        ahead = sum(1 for i in book.all() if i.status in ("queued", "running")) - 1
        return [], {"ok": True, "run_id": run_id, "ahead": ahead}
    if op == "list":
        return [], {
            "ok": True,
            "active": lifecycle.active,
            "runs": [i.as_json() for i in book.all()],
        }
    wanted = request.get("run_id")
    if not isinstance(wanted, str) or not wanted:
        raise AggregatorError(
            f"{op!r} needs a run_id"
            if op in ("stop", "resume", "show")
            else f"unknown request {op!r}; known: {KNOWN}"
        )
    run_id = wanted
    if op == "stop":
        outs = lifecycle.stop(run_id, str(request.get("reason") or "stopped by the operator"))
        return outs, {"ok": True, "run": book.info(run_id).as_json()}
    if op == "resume":
        lifecycle.resume(run_id)
        return [], {"ok": True, "run": book.info(run_id).as_json()}
    if op == "show":
        info = book.info(run_id)
        engine = lifecycle.engine
        live: dict[str, Any] | None = None
        if engine is not None and engine.run_id == run_id and lifecycle.active == run_id:
            live = {"doing": list(doing_of(engine, run_id)), **engine.status()}
        return [], {
            "ok": True,
            "run": info.as_json(),
            "service": book.ledger.get_state(run_id, SERVICE),
            "live": live,
            "rounds": [
                {"round": r.round, "committed": r.committed_at is not None, **r.metrics}
                for r in book.ledger.rounds(run_id)
            ],
        }
    raise AggregatorError(f"unknown request {op!r}; known: {KNOWN}")
