"""The agent daemon: the link thread's loop (Paranoid Pirate worker) around the worker thread.

One session: open the DEALER, send ``Hello``, wait for ``Welcome`` (an ``ErrorReply`` such as
VERSION_MISMATCH or UNKNOWN_AGENT instead ends the daemon with exit code 2). After ``Welcome``:
resend every outbox entry in order, probe RTT and bandwidth, heartbeat every interval (idle or
busy with task and progress). Any message from the aggregator proves it alive; after ``liveness``
intervals of silence the socket is closed and, after a backoff (``reconnect_min`` doubling to
``reconnect_max``, ±25% jitter), a new session starts with a new ``Hello``.

A ``Bye`` that names a run says that run is over: the agent stays connected, says so once in
its log, and joins the next run when the aggregator (which then no longer knows it) answers a
heartbeat with UNKNOWN_AGENT and a new ``Hello`` is welcomed. A ``Bye`` without a run id (the
aggregator shutting down) ends the session. MODEL_MISMATCH or UNSUPPORTED_METHOD in answer to
the Hello mean the active run is not for this agent: it logs what it waits for once and asks
again every ``reconnect_max`` seconds.

Incoming: ``TaskAssign`` → params checked with :func:`protocol.methods.parse_params`, then the
stored result is resent (task already done), ignored (queued or running) or queued for the
worker; ``Ack`` → the result leaves the outbox; ``ErrorReply`` STALE_TASK/REJECTED_UPDATE for a
task → the result leaves the outbox with a warning. SIGTERM/SIGINT: the worker stops at its next
step, ``Bye`` goes out, the socket closes, exit code 0; the outbox stays on disk.

Collaborators: :mod:`edge_agent.daemon.handshake` says what the Hello holds and which answers are
refusals; :class:`~edge_agent.daemon.heartbeats.Heartbeats` keeps the session's timing (heartbeats,
liveness, link probes); :class:`~edge_agent.daemon.uploads.Uploads` sends results (outbox resends,
grants, acks).
"""

from __future__ import annotations

import enum
import logging
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from edge_agent.daemon.config import AgentConfig
from edge_agent.daemon.handshake import agent_profile, is_refusal, make_hello, no_answer_hint
from edge_agent.daemon.heartbeats import Heartbeats
from edge_agent.daemon.link import Backoff, CurveKeys, Link, LinkSettings, agent_log
from edge_agent.daemon.metrics import AgentMetrics
from edge_agent.daemon.outbox import Outbox
from edge_agent.daemon.uploads import Uploads
from edge_agent.daemon.worker import Job, Outgoing, Worker, error_reply, task_tag
from edge_agent.daemon.workspace import AgentWorkspace, WorkspaceSettings
from edge_agent.methods import MethodFactory
from edge_agent.privacy.secagg_method import secure_methods
from protocol import PROTOCOL_VERSIONS
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import Decoded, encode
from protocol.messages import Ack, Bye, ErrorReply, Grant, Heartbeat, Profile, TaskAssign, Welcome
from protocol.methods import parse_params
from protocol.privacy import method_params

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 2
MAX_POLL_S = 0.05
"""Longest the link thread blocks: bounds how late a finished result or a stop is noticed."""
DROPS = frozenset({ErrorCode.STALE_TASK, ErrorCode.REJECTED_UPDATE})


class _End(enum.Enum):
    STOP = "stop"
    REFUSED = "refused"
    LOST = "lost"
    WAIT = "wait"
    """The active run is not one this agent can join (another model): ask again later."""


WAITS = frozenset({ErrorCode.MODEL_MISMATCH, ErrorCode.UNSUPPORTED_METHOD})
"""Answers to Hello that the next run may not give: the agent waits (``reconnect_max``
between tries) instead of exiting."""


@dataclass(frozen=True)
class DaemonSettings:
    link: LinkSettings
    heartbeat_interval: float = 1.0
    liveness: int = 3
    shutdown_grace: float = 30.0
    """Seconds to wait for the worker's current step on shutdown."""
    bandwidth_limit_mbps: float | None = None
    """A simulated link rate (agent.bandwidth_limit_mbps); None: the real link only."""
    stop_on_bye: bool = False
    """End :meth:`Daemon.run` when the aggregator says Bye (a regional tier whose upstream run
    finished) instead of reconnecting for the next run."""
    role: Literal["agent", "region"] = "agent"
    """What the Hello says this daemon is (a regional tier's upstream link says ``region``)."""


class Daemon:
    """Owns the link, the worker thread and the outbox; :meth:`run` blocks until stopped."""

    def __init__(
        self,
        settings: DaemonSettings,
        *,
        workspace: AgentWorkspace,
        outbox: Outbox,
        profile: Profile,
        methods: Mapping[str, MethodFactory],
        clock: Callable[[], float] = time.monotonic,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """Prometheus metrics (:mod:`edge_agent.daemon.metrics`) when an endpoint serves them."""
        self.agent_id = settings.link.agent_id
        self.workspace = workspace
        self.outbox = outbox
        self.profile = profile
        self.methods = dict(methods)
        self.model_sha256 = workspace.model_sha256()
        self.clock = clock
        self.log = agent_log(logger, self.agent_id)
        self._stop = workspace.stop_event
        self._force = False
        self.link = Link(settings.link)
        self.backoff = Backoff(settings.link.reconnect_min, settings.link.reconnect_max)
        self.beats = Heartbeats(
            agent_id=self.agent_id,
            interval=settings.heartbeat_interval,
            liveness=settings.liveness,
            bandwidth_limit_mbps=settings.bandwidth_limit_mbps,
            clock=clock,
        )
        outgoing: queue.Queue[Outgoing] = queue.Queue()
        self.uploads = Uploads(
            agent_id=self.agent_id,
            link=self.link,
            outbox=outbox,
            outgoing=outgoing,
            announce=self.beats.beat_now,
        )
        self.worker = Worker(
            agent_id=self.agent_id,
            methods=secure_methods(self.methods),
            workspace=workspace,
            outbox=outbox,
            outgoing=outgoing,
            stop=self._stop,
            bandwidth_limit_mbps=settings.bandwidth_limit_mbps,
            metrics=metrics,
        )
        self._welcomed = False
        self._hello_id = ""
        self._run_over = ""  # the run the aggregator said is over (we wait for the next)
        self._waiting_for = ""  # why the aggregator would not take us (logged once)
        self._unanswered = 0  # Hellos in a row that got no answer
        self._told = ""  # the handshake failure last logged

    @classmethod
    def from_config(cls, config: AgentConfig) -> Daemon:
        """Build everything the config names; user errors raise :class:`EdgeAgentError`."""
        a, sec = config.agent, config.security
        log = agent_log(logger, a.id)
        if sec.insecure:
            curve = None
            log.warning(
                "SECURITY WARNING: CURVE is OFF (insecure = true). Traffic to %s is neither "
                "encrypted nor authenticated; use this only on a trusted test network.",
                a.aggregator,
            )
        else:
            assert sec.secret_key is not None and sec.server_public_key is not None
            curve = CurveKeys.load(sec.secret_key, sec.server_public_key)
        outbox = Outbox(config.outbox_dir)
        try:
            workspace = AgentWorkspace(WorkspaceSettings.from_config(config))
            workspace.prepare()
            profile = agent_profile(config)
            from edge_agent.methods import client_methods

            link = LinkSettings(a.id, a.aggregator, curve, a.reconnect_min, a.reconnect_max)
            settings = DaemonSettings(
                link, a.heartbeat_interval, a.liveness, bandwidth_limit_mbps=a.bandwidth_limit_mbps
            )
            methods = client_methods()
            metrics = None
            if a.metrics_port is not None:  # last: nothing else can fail once it listens
                metrics = AgentMetrics()
                metrics.serve(a.metrics_port, a.metrics_host)
                log.info("Prometheus metrics on %s", metrics.url)
            return cls(
                settings,
                workspace=workspace,
                outbox=outbox,
                profile=profile,
                methods=methods,
                metrics=metrics,
            )
        except BaseException:
            outbox.close()
            raise

    # ------------------------------------------------------------------------------ control

    def request_stop(self, *, force: bool = False) -> None:
        """Ask :meth:`run` to end (thread- and signal-safe); ``force`` skips waiting for work."""
        self._force = self._force or force
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Serve until stopped (0) or refused by the aggregator (2)."""
        self.worker.start()
        try:
            return self._serve()
        finally:
            self._shutdown()

    def _serve(self) -> int:
        while not self._stop.is_set():
            end = self._session()
            if end is _End.REFUSED:
                return EXIT_REFUSED
            if end is _End.STOP:
                break
            self.link.close()
            if end is _End.WAIT:
                delay = self.backoff.high
                self.log.debug("asking again in %.0f s", delay)
            else:
                delay = self.backoff.next_delay()
                self.log.info("reconnecting in %.2f s", delay)
            if self._stop.wait(delay):
                break
        return EXIT_OK

    def _shutdown(self) -> None:
        self._stop.set()
        if self.link.is_open:
            if self._welcomed:
                self.link.send(encode(Bye(reason="agent shutting down")))
            self.link.close()
        if not self._force and not self.worker.join(self.settings.shutdown_grace):
            self.log.warning(
                "worker still busy after %.0f s; exiting anyway", self.settings.shutdown_grace
            )
        self._welcomed = False
        waiting = len(self.outbox)
        self.outbox.close()
        self.log.info("stopped; %d results wait in the outbox", waiting)
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------------------------ session

    def _session(self) -> _End:
        try:
            return self._session_loop()
        finally:
            if self.metrics is not None:
                self.metrics.disconnected()

    def _session_loop(self) -> _End:
        self.link.open()
        self._welcomed = False
        beats = self.beats
        beats.start_session(self.clock())
        self._send_hello()
        while not self._stop.is_set():
            now = self.clock()
            if beats.lost(now):
                if not self._welcomed:
                    self._no_answer()
                else:
                    self.log.warning(
                        "aggregator silent for %.2f s (%d × %.2f s); reconnecting",
                        beats.silence(now),
                        beats.liveness,
                        beats.interval,
                    )
                return _End.LOST
            wait = min(MAX_POLL_S, beats.until_lost(now))
            if self._welcomed:
                if beats.due(now):
                    beat = beats.beat(now, self.worker.current(), self.uploads.ready())
                    self.link.send(encode(beat))
                self.uploads.flush()
                if self.metrics is not None:
                    self.metrics.waiting(len(self.outbox))
                beats.expire_probes(now)
                wait = min(wait, beats.until_due(now))
            try:
                message = self.link.recv(max(wait, 0.0))
            except FrameError as exc:
                beats.heard(self.clock())
                self.log.warning("malformed message from the aggregator dropped: %s", exc)
                continue
            if message is not None:
                beats.heard(self.clock())
                try:
                    end = self._handle(message)
                except Exception:  # a bug or a disk fault must not end the daemon
                    self.log.exception("error handling %s; continuing", message.header.type)
                    continue
                if end is not None:
                    return end
        return _End.STOP

    def _send_hello(self) -> None:
        hello = make_hello(
            agent_id=self.agent_id,
            profile=self.profile,
            methods=self.methods,
            model_sha256=self.model_sha256,
            holds=self.workspace.objects.holdings(),
            role=self.settings.role,
        )
        self._hello_id = hello.msg_id
        self.link.send(encode(hello))
        self.log.info("hello sent to %s", self.settings.link.endpoint)

    # ------------------------------------------------------------------------------ messages

    def _handle(self, message: Decoded) -> _End | None:
        h = message.header
        if isinstance(h, Welcome):
            return self._on_welcome(h)
        if isinstance(h, Heartbeat):
            if h.echo:
                probe = self.beats.on_echo(h.echo, self.clock())
                if probe is not None:
                    self.link.send(probe)
        elif isinstance(h, TaskAssign):
            if self._welcomed:
                self._on_assign(h, message.blobs)
            else:
                self.log.warning("%s: assigned before Welcome; ignored", task_tag(h))
        elif isinstance(h, Grant):
            self.uploads.on_grant(h)
        elif isinstance(h, Ack):
            self.uploads.on_ack(h)
        elif isinstance(h, ErrorReply):
            return self._on_error(h)
        elif isinstance(h, Bye):
            return self._on_bye(h)
        else:
            self.log.warning("unexpected %s message from the aggregator ignored", h.type)
        return None

    def _on_bye(self, h: Bye) -> _End | None:
        """A Bye naming a run: that run is over, stay connected for the next; without one: the
        aggregator is going away, reconnect (with backoff)."""
        if self.settings.stop_on_bye:
            self.log.info("aggregator said bye (%s)", h.reason or "no reason")
            self._stop.set()
            return _End.STOP
        if h.run_id:
            if h.run_id != self._run_over:
                self._run_over = h.run_id
                self.log.info(
                    "run %s: %s; staying connected, waiting for the next run",
                    h.run_id,
                    h.reason or "over",
                )
            return None
        self.log.info(
            "aggregator said bye (%s); waiting for it to come back (retrying every %.0f s at most)",
            h.reason or "no reason",
            self.backoff.high,
        )
        self._unanswered = 1  # its absence is announced: no error when the next Hello fails
        return _End.LOST

    def _no_answer(self) -> None:
        """A Hello got no answer: the first time in a row an error with what to check (unless
        the aggregator said it was going away), then quietly (each retry is logged)."""
        problem = self.link.handshake_problem()
        if problem is not None and problem != self._told:
            self.log.error("%s", problem)  # the aggregator's side said why: say it once
            self._told = problem
        elif problem is None and self._unanswered == 0:
            self.log.error("%s", no_answer_hint(self.link.settings))
        self._unanswered += 1
        if self._unanswered in (10, 100, 1000):
            self.log.warning(
                "still no answer from %s after %d tries",
                self.link.settings.endpoint,
                self._unanswered,
            )

    def _on_welcome(self, h: Welcome) -> _End | None:
        if h.version not in PROTOCOL_VERSIONS:
            self.log.error("aggregator chose protocol version %d, not one of ours", h.version)
            return _End.REFUSED
        now = self.clock()
        self._welcomed = True
        self.beats.welcome(h.heartbeat_interval, h.liveness, now)
        self.backoff.reset()
        self._waiting_for = ""
        self._unanswered = 0
        self._told = ""
        self.log.info(
            "welcomed to run %s: protocol v%d, heartbeat %.2f s, liveness %d",
            h.run_id or "-",
            h.version,
            h.heartbeat_interval,
            h.liveness,
        )
        self.uploads.start_session(h.grant_above)
        self.link.send(self.beats.start_probes(now))
        if self.metrics is not None:
            self.metrics.welcomed()
        return None

    def _on_assign(self, h: TaskAssign, blobs: Mapping[str, memoryview]) -> None:
        tag = task_tag(h)
        if self.uploads.resend_stored(h):
            return
        if self.worker.knows(h.task_id):
            self.log.debug("%s: already queued or running; assignment ignored", tag)
            return
        if h.method not in self.methods:
            reason = f"this agent does not run method {h.method!r}"
            self.log.warning("%s: %s", tag, reason)
            self.link.send(error_reply(h, ErrorCode.UNSUPPORTED_METHOD, reason))
            return
        try:
            params = parse_params(h.method, method_params(h.params))
        except ProtocolError as exc:
            self.log.warning("%s: rejected: %s", tag, exc)
            self.link.send(error_reply(h, exc.code, str(exc)))
            return
        self.worker.submit(Job(assign=h, params=params, blobs=blobs))
        self.log.info("%s: %s %s queued", tag, h.method, h.kind)

    def _on_error(self, h: ErrorReply) -> _End | None:
        if not self._welcomed and is_refusal(h, self._hello_id):
            if h.code in WAITS:
                if h.reason != self._waiting_for:
                    self._waiting_for = h.reason
                    self.log.warning(
                        "waiting for a run this agent can join (asking every %.0f s): %s: %s",
                        self.backoff.high,
                        h.code.value,
                        h.reason,
                    )
                return _End.WAIT
            self.log.error("aggregator refused this agent: %s: %s", h.code.value, h.reason)
            return _End.REFUSED
        if h.task_id and h.code in DROPS:
            self.uploads.drop(h)
            return None
        if h.code is ErrorCode.UNKNOWN_AGENT and self._welcomed:
            if self._run_over:  # expected: the next run has started
                self.log.info("a new run may have started; saying hello again")
            else:
                self.log.warning("aggregator no longer knows this agent; saying hello again")
            self._welcomed = False
            self._send_hello()
            return None
        self.log.warning("aggregator error %s: %s", h.code.value, h.reason)
        return None
