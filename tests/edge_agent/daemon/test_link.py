"""The agent daemon over real loopback sockets against a fake aggregator (a ROUTER in the test).

Timings: heartbeat interval 0.1 s and liveness 3, so the agent gives up on a silent aggregator
after 0.3 s; the fake training step sleeps 0.9 s, three liveness windows.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
import zmq.auth
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from edge_agent.daemon.daemon import Daemon, DaemonSettings
from edge_agent.daemon.link import Backoff, CurveKeys, LinkSettings
from edge_agent.daemon.metrics import AgentMetrics
from edge_agent.daemon.outbox import Outbox
from edge_agent.daemon.workspace import AgentWorkspace, WorkspaceSettings
from edge_agent.errors import ConfigError, TaskError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from protocol.errors import ErrorCode
from protocol.frames import Decoded, decode, encode, frames_nbytes
from protocol.messages import (
    Ack,
    BaseModelRef,
    Bye,
    ErrorReply,
    Heartbeat,
    Hello,
    Profile,
    TaskAssign,
    TaskResult,
    Welcome,
)

ROOT = Path(__file__).resolve().parents[3]
AGENT = "edge-1"
SHA = "5a" * 32
OTHER_SHA = "0f" * 32
INTERVAL, LIVENESS = 0.1, 3
WINDOW = INTERVAL * LIVENESS
RELEASE = threading.Event()
"""A sleep-* task holds at half way until the test sets this (after seeing heartbeats flow)."""
PROFILE = Profile(
    hostname="edge-host",
    os="Linux",
    python="3.11",
    torch="2.13",
    cpus=2,
    ram_total=8 << 30,
    ram_available=6 << 30,
    disk_free=10 << 30,
)
RUNS: list[str] = []
H = TypeVar("H", bound=BaseModel)


@dataclass(frozen=True)
class FakeResolved:
    name: str
    path: Path
    sha256: str


class FakeWorkspace(AgentWorkspace):
    """The real workspace (data, progress, stop, hash check) with a fake model store."""

    def _resolve(self) -> FakeResolved:
        return FakeResolved("fake-model", Path("/nonexistent"), SHA)

    def _load_base(self, quant: str) -> tuple[Any, Any]:
        return (f"model-{quant}", "tokenizer")


class FakeMethod:
    """Behaviour picked by task id prefix: sleep-*, crash-*, base-*, stop-*."""

    name = "fedit"

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        task_id = task.assign.task_id
        RUNS.append(task_id)
        if task_id.startswith("crash"):
            raise RuntimeError("boom")
        if task_id.startswith("base"):
            model, _ = ws.base(task.assign.model, task.assign.quant)
            return TaskOutput(num_examples=1, metrics={"loaded": float(model == "model-nf4")})
        duration = 30.0 if task_id.startswith("stop") else 0.05
        steps = 30
        for step in range(steps):
            if ws.should_stop():
                raise TaskError("stopped")
            time.sleep(duration / steps)
            ws.report_progress((step + 1) / steps)
            if task_id.startswith("sleep") and step + 1 == steps // 2:
                while not RELEASE.wait(0.05):
                    if ws.should_stop():
                        raise TaskError("stopped")
        n = len(ws.train_examples)
        return TaskOutput(num_examples=n, metrics={"loss": 1.25}, blobs={"update": b"u" * 3000})


@dataclass
class Received:
    at: float
    message: Decoded


class FakeAggregator:
    """A ROUTER that records what arrives and answers heartbeats (probes with their echo)."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context.instance()
        self.port: int | None = None
        self.received: list[Received] = []
        self.socket: zmq.Socket[Any] | None = None
        self.open()

    def open(self, curve_secret: bytes | None = None) -> None:
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        if self.port is None:
            self.port = sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            deadline = time.monotonic() + 2
            while True:  # close() unbinds asynchronously in ZeroMQ's I/O thread
                try:
                    sock.bind(f"tcp://127.0.0.1:{self.port}")
                    break
                except zmq.ZMQError:
                    if time.monotonic() > deadline:
                        sock.close()
                        raise
                    time.sleep(0.01)
        self.socket = sock

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def send(self, header: Any, blobs: dict[str, bytes] | None = None) -> None:
        assert self.socket is not None
        self.socket.send_multipart([AGENT.encode(), *encode(header, blobs)])

    def welcome(self, **extra: Any) -> None:
        self.send(
            Welcome(
                agent_id=AGENT, version=1, heartbeat_interval=INTERVAL, liveness=LIVENESS, **extra
            )
        )

    def expect(
        self,
        cls: type[H],
        task_id: str | None = None,
        *,
        where: Callable[[H], bool] | None = None,
        timeout: float = 5.0,
        answer: bool = True,
    ) -> tuple[H, Decoded]:
        """Receive until a ``cls`` message (for ``task_id``, passing ``where``) arrives."""
        assert self.socket is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.socket.poll(20):
                continue
            identity, *frames = self.socket.recv_multipart()
            assert identity == AGENT.encode()
            message = decode(frames)
            self.received.append(Received(time.monotonic(), message))
            h = message.header
            if answer and isinstance(h, Heartbeat):
                self.send(Heartbeat(echo=h.msg_id) if h.probe else Heartbeat())
            if (
                isinstance(h, cls)
                and (task_id is None or getattr(h, "task_id", None) == task_id)
                and (where is None or where(h))
            ):
                return h, message
        kinds = [r.message.header.type for r in self.received[-20:]]
        raise AssertionError(f"no {cls.__name__} within {timeout} s; last: {kinds}")

    def of_type(self, cls: type[H], since: float = 0.0) -> list[tuple[float, H]]:
        return [
            (r.at, r.message.header)
            for r in self.received
            if isinstance(r.message.header, cls) and r.at >= since
        ]


def assign(task_id: str, sha: str = SHA, method: str = "fedit", **params: Any) -> TaskAssign:
    return TaskAssign(
        run_id="run-7",
        round=4,
        task_id=task_id,
        method=method,
        model=BaseModelRef(name="fake-model", sha256=sha),
        params=params,
    )


@dataclass
class Running:
    """A daemon running in a thread of the test process."""

    daemon: Daemon
    code: list[int] = field(default_factory=list)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=lambda: self.code.append(self.daemon.run()))
        self.thread.start()

    def stop(self) -> int:
        self.daemon.request_stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.code[0]


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.data = tmp_path / "train.jsonl"
        self.data.write_text(
            "".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(10))
        )
        self.outbox_dir = tmp_path / "state" / "outbox"
        self.agg = FakeAggregator()
        self.running: list[Running] = []

    def start(self, curve: CurveKeys | None = None, metrics: AgentMetrics | None = None) -> Running:
        link = LinkSettings(AGENT, self.agg.endpoint, curve, reconnect_min=0.05, reconnect_max=0.2)
        settings = DaemonSettings(link, heartbeat_interval=INTERVAL, liveness=LIVENESS)
        ws = FakeWorkspace(
            WorkspaceSettings(
                model="fake-model", data=self.data, objects_dir=self.tmp_path / "state" / "objects"
            )
        )
        ws.prepare()
        daemon = Daemon(
            settings,
            workspace=ws,
            outbox=Outbox(self.outbox_dir),
            profile=PROFILE,
            methods={"fedit": FakeMethod},
            metrics=metrics,
        )
        running = Running(daemon)
        self.running.append(running)
        return running

    def connect(self) -> tuple[Running, Hello]:
        running = self.start()
        hello, _ = self.agg.expect(Hello)
        self.agg.welcome()
        return running, hello

    def wait_outbox_empty(self) -> None:
        deadline = time.monotonic() + 3
        while self.outbox_files() and time.monotonic() < deadline:
            self.agg.expect(Heartbeat)

    def outbox_files(self) -> list[str]:
        return sorted(p.name for p in self.outbox_dir.glob("*.efed"))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    RUNS.clear()
    h = Harness(tmp_path)
    yield h
    for running in h.running:
        running.daemon.request_stop(force=True)
        running.thread.join(10)
    h.agg.close()


def test_result_survives_restart_heartbeats_flow_during_training(harness: Harness) -> None:
    agg = harness.agg
    first, hello = harness.connect()
    assert (hello.agent_id, hello.versions, hello.methods, hello.models) == (
        AGENT,
        [1],
        ["fedit"],
        [SHA],
    )
    assert hello.profile.cpus == 2 and hello.profile.rtt_ms is None
    assert hello.holds == []

    # Link measurements: an empty probe, a 1 MiB probe, then both numbers in a heartbeat.
    report, _ = agg.expect(Heartbeat, where=lambda h: h.rtt_ms is not None)
    probes = [h for _, h in agg.of_type(Heartbeat) if h.probe]
    assert [[(b.name, b.nbytes) for b in p.blobs] for p in probes] == [[], [("probe", 1 << 20)]]
    assert report.rtt_ms is not None and report.rtt_ms > 0
    assert report.bandwidth_mbps is not None and report.bandwidth_mbps > 0

    RELEASE.clear()
    sent_at = time.monotonic()
    agg.send(assign("sleep-1"))

    def busy() -> list[Heartbeat]:
        return [h for _, h in agg.of_type(Heartbeat, since=sent_at) if h.state == "busy"]

    # The step holds (half done) until heartbeats have kept coming through it: 6 busy beats,
    # two liveness windows' worth, all while the method's thread is inside its step.
    agg.expect(Heartbeat, where=lambda h: len(busy()) >= 2 * LIVENESS, timeout=60)
    assert agg.of_type(TaskResult) == []
    RELEASE.set()
    result, message = agg.expect(TaskResult, timeout=60)
    assert {h.task_id for h in busy()} == {"sleep-1"}
    progress = [h.progress for h in busy()]
    assert progress == sorted(progress) and progress[-1] >= 0.5
    assert len(agg.of_type(Hello)) == 1  # no reconnect during the long step

    assert (result.task_id, result.agent_id, result.method, result.kind) == (
        "sleep-1",
        AGENT,
        "fedit",
        "train",
    )
    assert (result.run_id, result.round, result.num_examples) == ("run-7", 4, 9)
    cpu = result.metrics.pop("cpu_seconds")  # every result carries its task's CPU time
    assert 0 <= cpu < 60 and result.metrics == {"loss": 1.25}
    assert bytes(message.blobs["update"]) == b"u" * 3000
    assert harness.outbox_files() == ["0000000001-sleep-1.efed"]

    # The same assignment again (our result was lost on its way?): resend, do not rerun.
    agg.send(assign("sleep-1"))
    again, _ = agg.expect(TaskResult)
    assert again.msg_id == result.msg_id
    assert RUNS == ["sleep-1"]

    # No Ack. Stop the daemon: Bye, exit 0, the result stays on disk.
    assert first.stop() == 0
    bye, _ = agg.expect(Bye)
    assert bye.reason == "agent shutting down"
    assert harness.outbox_files() == ["0000000001-sleep-1.efed"]

    # A new daemon on the same state dir resends it after Welcome; the Ack empties the outbox.
    second, _ = harness.connect()
    resent, message = agg.expect(TaskResult)
    assert resent.msg_id == result.msg_id
    assert bytes(message.blobs["update"]) == b"u" * 3000
    agg.send(Ack(task_id="sleep-1"))
    harness.wait_outbox_empty()
    assert harness.outbox_files() == []
    assert RUNS == ["sleep-1"]
    assert second.stop() == 0


def test_reconnects_with_a_new_hello_after_the_aggregator_goes_silent(harness: Harness) -> None:
    agg = harness.agg
    running, _ = harness.connect()
    agg.expect(Heartbeat)
    agg.close()
    closed_at = time.monotonic()
    agg.open()  # same port, a new socket that stays silent: no answers to heartbeats
    hello, _ = agg.expect(Hello, answer=False, timeout=60)
    silent_for = time.monotonic() - closed_at
    # Not before the liveness window (0.3 s, counted from the last answer, which may be one
    # heartbeat before the close if the close swallowed the latest); how late is up to the box.
    assert silent_for > WINDOW - INTERVAL
    assert hello.agent_id == AGENT
    agg.welcome()
    welcomed_at = time.monotonic()
    agg.expect(Heartbeat, where=lambda h: time.monotonic() - welcomed_at > 2 * WINDOW)
    assert agg.of_type(Hello, since=welcomed_at) == []  # stays up while answered

    # An aggregator that forgot the agent (restart, registry expiry) gets a new Hello at once.
    beat, _ = agg.expect(Heartbeat)
    agg.send(ErrorReply(code=ErrorCode.UNKNOWN_AGENT, reason="who are you", ref=beat.msg_id))
    # Heartbeats are answered meanwhile (liveness never runs out): the refusal is the cause.
    agg.expect(Hello, timeout=60)
    # The answer to a heartbeat still in flight is not a refusal of that Hello.
    agg.send(ErrorReply(code=ErrorCode.UNKNOWN_AGENT, reason="who are you", ref="late-beat"))
    agg.welcome()
    agg.expect(Heartbeat, where=lambda h: not h.probe)
    assert running.code == [] and running.thread.is_alive()


def test_version_mismatch_ends_run_with_exit_code_2(harness: Harness) -> None:
    running = harness.start()
    hello, _ = harness.agg.expect(Hello)
    harness.agg.send(
        ErrorReply(code=ErrorCode.VERSION_MISMATCH, reason="speaks [2]", ref=hello.msg_id)
    )
    running.thread.join(5)
    assert not running.thread.is_alive()
    assert running.code == [2]


def test_task_failures_become_error_replies_and_the_daemon_keeps_running(
    harness: Harness,
) -> None:
    agg = harness.agg
    harness.connect()

    agg.send(assign("bad-params", train={"steps": 0}))
    reply, _ = agg.expect(ErrorReply, "bad-params")
    assert reply.code is ErrorCode.BAD_HEADER and "train.steps" in reply.reason

    agg.send(assign("other-method", method="ferret"))
    reply, _ = agg.expect(ErrorReply, "other-method")
    assert reply.code is ErrorCode.UNSUPPORTED_METHOD

    agg.send(assign("base-wrong", sha=OTHER_SHA))
    reply, _ = agg.expect(ErrorReply, "base-wrong")
    assert reply.code is ErrorCode.MODEL_MISMATCH
    assert OTHER_SHA in reply.reason and SHA in reply.reason
    assert (reply.run_id, reply.round) == ("run-7", 4)

    agg.send(assign("base-right"))
    result, _ = agg.expect(TaskResult, "base-right")
    assert result.metrics.keys() == {"loaded", "cpu_seconds"} and result.metrics["loaded"] == 1.0

    agg.send(assign("crash-1"))
    reply, _ = agg.expect(ErrorReply, "crash-1")
    assert reply.code is ErrorCode.TASK_FAILED and reply.reason == "RuntimeError: boom"

    agg.send(assign("quick-1"))
    agg.expect(TaskResult, "quick-1")
    assert harness.outbox_files() == ["0000000001-base-right.efed", "0000000002-quick-1.efed"]
    agg.send(ErrorReply(code=ErrorCode.STALE_TASK, reason="round over", task_id="quick-1"))
    agg.send(Ack(task_id="base-right"))
    harness.wait_outbox_empty()
    assert harness.outbox_files() == []
    assert RUNS == ["base-wrong", "base-right", "crash-1", "quick-1"]


def test_stop_during_a_task_interrupts_it_and_sends_nothing(harness: Harness) -> None:
    agg = harness.agg
    running, _ = harness.connect()
    agg.send(assign("stop-1"))
    agg.expect(Heartbeat, where=lambda h: h.state == "busy")
    stopped_at = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - stopped_at < 2.0  # the 30 s task ended at its next step
    agg.expect(Bye)
    assert agg.of_type(TaskResult) == [] and agg.of_type(ErrorReply) == []
    assert harness.outbox_files() == []


def test_curve_link_delivers_hello_to_a_curve_server(harness: Harness, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, server_secret_file = zmq.auth.create_certificates(keys, "server")
    _, agent_secret_file = zmq.auth.create_certificates(keys, "agent")
    _, server_secret = zmq.auth.load_certificate(server_secret_file)
    assert server_secret is not None
    harness.agg.close()
    harness.agg.open(curve_secret=server_secret)
    harness.start(curve=CurveKeys.load(Path(agent_secret_file), Path(server_public)))
    hello, _ = harness.agg.expect(Hello)
    assert hello.agent_id == AGENT


AGENT_PROCESS = textwrap.dedent(
    """
    import json, sys, types
    from pathlib import Path

    import edge_agent.methods
    from edge_agent.methods import TaskOutput

    config, sha, profile = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = types.ModuleType("edge_agent.model.store")
    store.resolve_model = lambda spec, cache_dir=None, progress=False: types.SimpleNamespace(
        name=spec, path=Path("/nonexistent"), sha256=sha
    )
    machine = types.ModuleType("edge_agent.daemon.profile")
    machine.collect_profile = lambda measure=True, disk_path=None: profile
    sys.modules["edge_agent.model.store"] = store
    sys.modules["edge_agent.daemon.profile"] = machine


    class Quick:
        name = "fedit"

        def run(self, task, ws):
            n = len(ws.train_examples)
            return TaskOutput(num_examples=n, metrics={"loss": 0.5}, blobs={"update": b"q" * 2048})


    edge_agent.methods.client_methods = lambda: {"fedit": Quick}
    from edge_agent.cli import main

    main(["run", "--config", config])
    """
)


def test_agent_process_killed_resends_after_restart_and_sigterm_says_bye(
    harness: Harness, tmp_path: Path
) -> None:
    agg = harness.agg
    script = tmp_path / "agent_process.py"
    script.write_text(AGENT_PROCESS)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nid = "{AGENT}"\naggregator = "{agg.endpoint}"\ndata = "train.jsonl"\n'
        "heartbeat_interval = 0.1\nreconnect_min = 0.05\nreconnect_max = 0.2\n"
        "[security]\ninsecure = true\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), str(config), SHA, PROFILE.model_dump_json()]
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "agent.log"

    def spawn() -> subprocess.Popen[bytes]:
        with open(logs, "ab") as out:
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        first = spawn()
        agg.expect(Hello, timeout=30)
        agg.welcome()
        agg.send(assign("proc-1"))
        result, _ = agg.expect(TaskResult, "proc-1", timeout=10)
        first.send_signal(signal.SIGKILL)  # crash before the Ack
        assert first.wait(10) == -signal.SIGKILL
        assert harness.outbox_files() == ["0000000001-proc-1.efed"]

        second = spawn()
        agg.expect(Hello, timeout=30)
        agg.welcome()
        resent, message = agg.expect(TaskResult, "proc-1")
        assert resent.msg_id == result.msg_id and resent.num_examples == 9
        assert bytes(message.blobs["update"]) == b"q" * 2048
        agg.send(Ack(task_id="proc-1"))
        harness.wait_outbox_empty()
        assert harness.outbox_files() == []

        second.send_signal(signal.SIGTERM)
        bye, _ = agg.expect(Bye)
        assert bye.reason == "agent shutting down"
        assert second.wait(10) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = logs.read_text()
    assert "Traceback" not in text
    assert "[edge-1] SIGTERM received; stopping" in text
    assert "[edge-1] resent 1 results from the outbox" in text


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    import random

    backoff = Backoff(1.0, 32.0, random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    nominal = [1, 2, 4, 8, 16, 32, 32, 32]
    assert all(0.75 * n <= d <= 1.25 * n for d, n in zip(delays, nominal, strict=True))
    assert max(delays) <= 32.0  # the cap holds with the jitter (a wait of 39.8 s was seen)
    assert max(Backoff(32.0, 32.0, random.Random(s)).next_delay() for s in range(50)) <= 32.0
    assert len({round(d / n, 6) for d, n in zip(delays, nominal, strict=True)}) > 1  # jittered
    backoff.reset()
    assert 0.75 <= backoff.next_delay() <= 1.25


def test_hello_lists_the_objects_the_agent_holds(harness: Harness) -> None:
    from edge_agent.daemon.objects import ObjectStore

    sha = ObjectStore(harness.tmp_path / "state" / "objects").put(b"an emulator")
    _, hello = harness.connect()
    assert hello.holds == [sha]


def test_a_large_result_waits_for_its_grant_and_is_resent_after_a_reconnect(
    harness: Harness,
) -> None:
    from protocol.messages import Grant

    agg = harness.agg
    harness.start()
    agg.expect(Hello)
    agg.welcome(grant_above=1000)
    agg.send(assign("big-1"))  # FakeMethod answers with a 3,000-byte blob: above 1,000
    beat, _ = agg.expect(Heartbeat, where=lambda h: h.ready == ["big-1"])
    for _ in range(3):  # announced in every heartbeat, never sent unasked
        agg.expect(Heartbeat, where=lambda h: h.ready == ["big-1"])
    assert [h for _, h in agg.of_type(TaskResult)] == []
    agg.send(Grant(task_id="big-1"))
    result, msg = agg.expect(TaskResult, "big-1")
    assert msg.blobs["update"].nbytes == 3000
    # not acked: after a reconnect it is announced again, not sent
    agg.send(ErrorReply(code=ErrorCode.UNKNOWN_AGENT, reason="restarted"))
    agg.expect(Hello)
    since = time.monotonic()
    agg.welcome(grant_above=1000)
    agg.expect(Heartbeat, where=lambda h: h.ready == ["big-1"])
    assert [h for _, h in agg.of_type(TaskResult, since=since)] == []
    agg.send(Ack(task_id="big-1"))
    agg.expect(Heartbeat, where=lambda h: h.ready == [] and not h.probe)  # probes carry no list
    assert harness.outbox_files() == []


def test_a_task_reopened_after_stale_task_is_retrained_and_its_new_result_sent(
    harness: Harness,
) -> None:
    """A restarted aggregator refuses a result STALE_TASK, then reopens the same task id: the
    retrained result must go out (it used to sit in the outbox until the agent restarted)."""
    agg = harness.agg
    harness.connect()
    agg.send(assign("t-1"))
    first, _ = agg.expect(TaskResult, "t-1")
    agg.send(ErrorReply(code=ErrorCode.STALE_TASK, reason="task t-1 is not open", task_id="t-1"))
    agg.expect(Heartbeat, where=lambda _h: harness.outbox_files() == [])
    agg.send(assign("t-1"))  # the round reopens with the same (deterministic) task id
    second, _ = agg.expect(TaskResult, "t-1", where=lambda h: h.msg_id != first.msg_id)
    assert RUNS == ["t-1", "t-1"]
    agg.send(Ack(task_id="t-1"))
    harness.wait_outbox_empty()
    assert harness.outbox_files() == []


def test_between_runs_the_agent_stays_connected_and_waits_for_a_run_of_its_model(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    agg = harness.agg
    running, first = harness.connect()
    agg.expect(Heartbeat)
    # the run is over: one log line, the session stays (no new Hello), heartbeats go on
    agg.send(Bye(run_id="r1", reason="run finished"))
    agg.send(Bye(run_id="r1", reason="run is over"))
    since = time.monotonic()
    agg.expect(Heartbeat, where=lambda _h: time.monotonic() - since > 2 * WINDOW)
    assert agg.of_type(Hello, since=since) == []
    assert caplog.text.count("run r1: run finished; staying connected") == 1
    # the next run (its engine does not know us yet) is on another model: wait, ask again
    beat, _ = agg.expect(Heartbeat)
    agg.send(ErrorReply(code=ErrorCode.UNKNOWN_AGENT, reason="say Hello first", ref=beat.msg_id))
    for _ in range(3):
        hello, _ = agg.expect(Hello, timeout=5)
        agg.send(
            ErrorReply(code=ErrorCode.MODEL_MISMATCH, reason="run r2 trains m2", ref=hello.msg_id)
        )
    assert caplog.text.count("waiting for a run this agent can join") == 1
    hello, _ = agg.expect(Hello, timeout=5)  # and a run of its model comes: it joins
    agg.welcome()
    agg.expect(Heartbeat, where=lambda h: not h.probe)
    assert running.code == [] and running.thread.is_alive()
    # an aggregator that goes away says so without a run id: the session ends, Hello again
    agg.send(Bye(reason="aggregator shutting down"))
    agg.expect(Hello, timeout=5)
    assert "aggregator said bye (aggregator shutting down); waiting for it" in caplog.text
    assert first.agent_id == hello.agent_id == AGENT


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples by ``name{label=value,...}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_the_metrics_endpoint_serves_what_the_agent_did(harness: Harness) -> None:
    p = "edgefed_agent_"
    agg = harness.agg
    metrics = AgentMetrics()
    port = metrics.serve(0)
    try:
        harness.start(metrics=metrics)
        agg.expect(Hello)
        assert scrape(port)[f"{p}connected"] == 0.0  # not welcomed yet
        agg.welcome()
        agg.send(assign("quick-1"))
        result, message = agg.expect(TaskResult, "quick-1")
        agg.send(assign("crash-1"))
        agg.expect(ErrorReply, "crash-1")
        agg.expect(Heartbeat)  # a loop turn after the result: the outbox gauge is current
        m = scrape(port)
        assert m[f"{p}connected"] == 1.0 and m[f"{p}sessions_total"] == 1.0
        assert m[f"{p}round"] == 4.0
        assert m[f"{p}tasks_completed_total{{kind=train}}"] == 1.0
        assert m[f"{p}tasks_failed_total{{code=TASK_FAILED,kind=train}}"] == 1.0
        assert m[f"{p}task_duration_seconds_count{{kind=train}}"] == 1.0
        assert m[f"{p}examples_total{{kind=train}}"] == result.num_examples > 0
        assert m[f"{p}result_bytes_total"] == frames_nbytes(encode(result, message.blobs))
        assert m[f"{p}outbox_results"] == 1.0  # quick-1 waits for its Ack
        agg.send(Ack(task_id="quick-1"))
        harness.wait_outbox_empty()
        agg.expect(Heartbeat)
        assert scrape(port)[f"{p}outbox_results"] == 0.0
        agg.close()  # the aggregator goes away: after liveness intervals, not connected
        deadline = time.monotonic() + 10
        while scrape(port)[f"{p}connected"] != 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scrape(port)[f"{p}connected"] == 0.0
    finally:
        metrics.close()


def test_a_metrics_port_in_use_is_a_config_error() -> None:
    taken = AgentMetrics()
    port = taken.serve(0)
    try:
        with pytest.raises(
            ConfigError, match=f"agent.metrics_port: cannot listen on 127.0.0.1:{port}"
        ):
            AgentMetrics().serve(port)
    finally:
        taken.close()
