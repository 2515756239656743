"""`edgefed-aggregator serve` as its own process, with agents speaking the real protocol.

What operators rely on: it refuses to start with an empty allow-list; SIGTERM lets the
round it is committing finish, then it exits 0; a key added to the allow-list while it runs is
admitted (docs/operations.md §3: the list is re-read every few seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from engine_harness import PROFILE, SHA, lora_state

from aggregator.engine.service import AggregatorService
from aggregator.ops.config import build_config
from aggregator.store.ledger import Ledger
from protocol import payloads
from protocol.frames import decode, encode
from protocol.messages import Ack, BaseModelRef, Hello, TaskAssign, TaskResult, Welcome

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, state: Path, security: str) -> Path:
    path.write_text(
        f'[server]\nbind = "tcp://127.0.0.1:0"\nstate_dir = "{state}"\n'
        "heartbeat_interval = 1.0\nliveness = 5\n"
        f"{security}\n"
        '[run]\nrun_id = "life"\nrounds = 3\nmin_agents = 2\neval = false\n'
        f'model_sha256 = "{SHA}"\nround_deadline_s = 120.0\n'
        '[method.lora]\nr = 4\nalpha = 8.0\ntarget_modules = ["q_proj"]\n',
        encoding="utf-8",
    )
    return path


class Serve:
    """`python -m aggregator serve` with its log read line by line on a thread."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--config", str(config), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout,
            )
            found = next((line for line in self.lines if text in line), None)
        assert ok and found is not None, f"no {text!r} in the log:\n{self.log()}"
        return found

    def log(self) -> str:
        return "".join(self.lines)

    def endpoint(self) -> str:
        return self.wait_for("aggregator listening on").split("listening on ")[1].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def agent(ctx: zmq.Context[Any], name: str, endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(
        zmq.SNDTIMEO, 30_000
    )  # a send with no connection fails the test, never hangs it
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket[bytes], header: Any, blobs: dict[str, bytes] | None = None) -> None:
    sock.send_multipart([bytes(f) for f in encode(header, blobs)])


def wait_message(sock: zmq.Socket[bytes], cls: type, timeout: float = 60.0) -> Any:
    """The next ``cls`` message (others, such as the service's heartbeats, are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(200):
            header = decode(sock.recv_multipart()).header
            if isinstance(header, cls):
                return header
    raise AssertionError(f"no {cls.__name__} within {timeout} s")


def hello(name: str) -> Hello:
    return Hello(agent_id=name, versions=[1], profile=PROFILE, models=[SHA])


def test_sigterm_lets_the_commit_finish_and_exits_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    serve = Serve(write_config(tmp_path / "agg.toml", state, "[security]\ninsecure = true"))
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        endpoint = serve.endpoint()
        socks = {name: agent(ctx, name, endpoint) for name in ("a1", "a2")}
        for name, sock in socks.items():
            send(sock, hello(name))
            wait_message(sock, Welcome)
        tasks = {name: wait_message(sock, TaskAssign) for name, sock in socks.items()}
        assert {t.round for t in tasks.values()} == {1}
        for value, (name, sock) in enumerate(socks.items(), start=1):
            t = tasks[name]
            blob = payloads.encode_lora(lora_state(float(value)), method="fedit", round=t.round)
            send(sock, TaskResult(run_id=t.run_id, round=t.round, task_id=t.task_id,
                                  agent_id=name, method="fedit", num_examples=8),
                 {"update": blob})  # fmt: skip
        for name, sock in socks.items():
            assert wait_message(sock, Ack).task_id == tasks[name].task_id
        # the last update is durable (acked); the round closes on the same turn of the loop.
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 0, serve.log()
    finally:
        serve.stop()
        ctx.destroy(linger=0)
    assert "Traceback" not in serve.log()
    with Ledger(state / "ledger.sqlite") as ledger:
        rounds = ledger.rounds("life")
        assert [r.round for r in rounds] == [1]
        assert rounds[0].committed_at is not None
        assert sorted(u.agent_id for u in ledger.updates("life", 1)) == ["a1", "a2"]
    assert list((state / "checkpoints").glob("*")), "round 1 left no checkpoint"


def test_refuses_to_start_with_an_empty_allow_list(tmp_path: Path) -> None:
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    security = f'[security]\nsecret_key = "{server_secret}"\nallow_dir = "{allow}"'
    serve = Serve(write_config(tmp_path / "agg.toml", tmp_path / "state", security))
    try:
        code = serve.proc.wait(120)
    finally:
        serve.stop()
    out = serve.log()
    assert code == 2, out
    assert f"allow-list {allow} is empty: no agent could connect" in out
    assert "Traceback" not in out and "listening on" not in out


# --- a key added while the service runs ---------------------------------------------------------


class CurveService:
    """An AggregatorService (CURVE on) on a thread of this process; "old" is allowed from the
    start, "new" has a key pair but is not on the allow-list yet."""

    def __init__(self, tmp: Path) -> None:
        self.keys, self.allow = tmp / "keys", tmp / "allow"
        self.keys.mkdir()
        self.allow.mkdir()
        self.server_public, server_secret = zmq.auth.create_certificates(str(self.keys), "server")
        for name in ("old", "new"):
            zmq.auth.create_certificates(str(self.keys), name)
        (self.keys / "old.key").rename(self.allow / "old.key")
        raw = {
            "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(tmp / "state")},
            "security": {"secret_key": server_secret, "allow_dir": str(self.allow)},
            "run": {"model_sha256": SHA, "min_agents": 5},
        }
        self.service = AggregatorService(build_config(raw), BaseModelRef(name="m", sha256=SHA))
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        assert self.service.bound.wait(30)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def client(self, name: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        self.sockets.append(sock)  # closed in close(), whoever else holds it
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 30_000)  # fail, never hang, when no connection is up
        public, secret = zmq.auth.load_certificate(self.keys / f"{name}.key_secret")
        sock.curve_publickey = public
        sock.curve_secretkey = secret  # type: ignore[assignment]
        sock.curve_serverkey = zmq.auth.load_certificate(self.server_public)[0]
        sock.connect(self.service.endpoint)
        return sock

    def add_new_key(self) -> None:
        (self.keys / "new.key").rename(self.allow / "new.key")

    def close(self) -> None:
        self.service.should_exit.set()
        self.thread.join(30)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def curve(tmp_path: Path) -> Iterator[CurveService]:
    c = CurveService(tmp_path)
    yield c
    c.close()


def admitted(curve: CurveService, timeout: float, talk: zmq.Socket[bytes] | None) -> bool:
    """Whether "new" gets a Welcome within ``timeout``, connecting afresh each try as the agent
    daemon does after a silent aggregator; ``talk``, if given, sends a message before each try."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if talk is not None:
            send(talk, hello("old"))
        new = curve.client("new")
        # a handshake refused before the send (a fast refusal on a loaded box) leaves the fresh
        # socket without a connection for good (libzmq drops it after a protocol error), so the
        # send cannot go: that try was refused, the next one connects afresh
        new.setsockopt(zmq.SNDTIMEO, 2_000)
        try:
            try:
                send(new, hello("new"))
            except zmq.Again:
                continue
            # a refused handshake never answers; an admitted one may be slow on a loaded box
            wait_ms = int(1000 * max(0.1, min(10.0, deadline - time.monotonic())))
            if new.poll(wait_ms) and isinstance(decode(new.recv_multipart()).header, Welcome):
                return True
        finally:
            new.close(linger=0)
    return False


def test_a_new_key_is_admitted_while_another_agent_talks(curve: CurveService) -> None:
    """The control for the test below: the same steps, with an agent that keeps talking."""
    old = curve.client("old")
    send(old, hello("old"))
    wait_message(old, Welcome, 30)
    assert not admitted(curve, 3, old)  # not on the list yet: refused
    curve.add_new_key()
    assert admitted(curve, 60, old)


def test_a_new_key_is_admitted_while_no_other_agent_talks(curve: CurveService) -> None:
    assert not admitted(curve, 3, None)  # not on the list yet: refused
    curve.add_new_key()
    assert admitted(curve, 60, None)  # re-read every few seconds: a minute is generous


def test_a_damaged_committed_checkpoint_exits_2_and_the_run_resumes_once_mended(
    tmp_path: Path,
) -> None:
    """The real process on state whose newest committed checkpoint rotted: it names the file
    and exits 2 (the unit's RestartPreventExitStatus: no restart loop), the run is not marked
    failed, and with the file restored the next start resumes after that round."""
    from engine_harness import Harness
    from serve_process import Served

    h = Harness(tmp_path / "state", run_id="hostile", rounds=3)
    for agent in ("a1", "a2"):
        h.hello(agent)
    while h.engine.round < 2:
        for o in h.tick():
            if isinstance(o.header, TaskAssign):
                h.result(o.header, o.agent_id, 10, lora_state(float(o.header.round)))
    h.close()
    path = tmp_path / "state" / "checkpoints" / "round-000002" / "global.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes(len(good) - 100))

    served = Served(tmp_path, ["a1"], rounds=3)
    try:
        with pytest.raises(AssertionError, match="serve did not start"):
            served.start()
        assert served.proc is not None and served.proc.wait(timeout=30) == 2
        assert f"{path} is corrupt" in served.logs()
        assert "restore" in served.logs() and "Traceback" not in served.logs()
        ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
        life = ledger.get_state("hostile", "lifecycle")
        ledger.close()
        assert not (isinstance(life, dict) and life.get("status") == "failed")

        path.write_bytes(good)
        served.start()
        assert "run hostile resumes after committed round 2" in served.logs()
    finally:
        served.stop()
