"""The agent daemon: the link thread's loop (Paranoid Pirate worker) around the worker thread.

One session: open the DEALER, send ``Hello``, wait for ``Welcome`` (an ``ErrorReply`` such as
VERSION_MISMATCH or UNKNOWN_AGENT instead ends the daemon with exit code 2). After ``Welcome``:
resend every outbox entry in order, probe RTT and bandwidth, heartbeat every interval (idle or
busy with task and progress). Any message from the aggregator proves it alive; after ``liveness``
intervals of silence the socket is closed and, after a backoff (``reconnect_min`` doubling to
``reconnect_max``, ±25% jitter), a new session starts with a new ``Hello``.

Incoming: ``TaskAssign`` → params checked with :func:`protocol.methods.parse_params`, then the
stored result is resent (task already done), ignored (queued or running) or queued for the
worker; ``Ack`` → the result leaves the outbox; ``ErrorReply`` STALE_TASK/REJECTED_UPDATE for a
task → the result leaves the outbox with a warning. SIGTERM/SIGINT: the worker stops at its next
step, ``Bye`` goes out, the socket closes, exit code 0; the outbox stays on disk.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, cast

from pydantic import ValidationError

from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.link import Backoff, CurveKeys, Link, LinkMeter, LinkSettings, agent_log
from edge_agent.methods import MethodFactory
from edge_agent.outbox import Outbox
from edge_agent.worker import Job, Outgoing, Worker, error_reply, task_tag
from edge_agent.workspace import AgentWorkspace, WorkspaceSettings
from protocol import PROTOCOL_VERSIONS
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import Decoded, encode, frames_nbytes
from protocol.messages import (
    Ack,
    Bye,
    ErrorReply,
    Grant,
    Heartbeat,
    Hello,
    Profile,
    TaskAssign,
    Welcome,
)
from protocol.methods import parse_params

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 2
MAX_POLL_S = 0.05
"""Longest the link thread blocks: bounds how late a finished result or a stop is noticed."""
PROBE_TIMEOUT_S = 60.0
"""A link probe not echoed within this (1 MiB on a slow uplink takes a while) is abandoned."""
REFUSALS = frozenset(
    {
        ErrorCode.VERSION_MISMATCH,
        ErrorCode.UNKNOWN_AGENT,
        ErrorCode.IDENTITY_MISMATCH,
        ErrorCode.MODEL_MISMATCH,
        ErrorCode.UNSUPPORTED_METHOD,
    }
)
"""Answers to Hello that retrying cannot fix: the daemon exits with code 2."""
DROPS = frozenset({ErrorCode.STALE_TASK, ErrorCode.REJECTED_UPDATE})


class _End(enum.Enum):
    STOP = "stop"
    REFUSED = "refused"
    LOST = "lost"


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
    ) -> None:
        self.settings = settings
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
        self.meter = LinkMeter()
        self._outgoing: queue.Queue[Outgoing] = queue.Queue()
        self.worker = Worker(
            agent_id=self.agent_id,
            methods=self.methods,
            workspace=workspace,
            outbox=outbox,
            outgoing=self._outgoing,
            stop=self._stop,
            bandwidth_limit_mbps=settings.bandwidth_limit_mbps,
        )
        self._welcomed = False
        self._interval = settings.heartbeat_interval
        self._liveness = settings.liveness
        self._last_recv = 0.0
        self._next_beat = 0.0
        self._sent_this_session: set[str] = set()
        self._hello_id = ""
        self._grant_above: int | None = None
        self._awaiting: dict[str, None] = {}  # large results waiting for a Grant, in order

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
            profile = _collect_profile(config)
            from edge_agent.methods import client_methods

            link = LinkSettings(a.id, a.aggregator, curve, a.reconnect_min, a.reconnect_max)
            settings = DaemonSettings(
                link, a.heartbeat_interval, a.liveness, bandwidth_limit_mbps=a.bandwidth_limit_mbps
            )
            return cls(
                settings,
                workspace=workspace,
                outbox=outbox,
                profile=profile,
                methods=client_methods(),
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

    def _no_answer_hint(self) -> str:
        where = self.link.settings.endpoint
        if self.link.settings.curve is None:
            return (
                f"no answer from the aggregator at {where}: check that it runs, that the address "
                "is right and reachable, and that it also runs with insecure = true"
            )
        return (
            f"no answer from the aggregator at {where}: check that it runs and is reachable, "
            "that security.server_public_key is the aggregator's public key, and that this "
            "agent's public key file is in the aggregator's allow-list directory"
        )

    def _serve(self) -> int:
        while not self._stop.is_set():
            end = self._session()
            if end is _End.REFUSED:
                return EXIT_REFUSED
            if end is _End.STOP:
                break
            self.link.close()
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

    # ------------------------------------------------------------------------------ session

    def _session(self) -> _End:
        self.link.open()
        self._welcomed = False
        self._interval, self._liveness = self.settings.heartbeat_interval, self.settings.liveness
        self._last_recv = self.clock()
        self._send_hello()
        while not self._stop.is_set():
            now = self.clock()
            window = self._interval * self._liveness
            if now - self._last_recv > window:
                if not self._welcomed:
                    self.log.error("%s", self._no_answer_hint())
                else:
                    self.log.warning(
                        "aggregator silent for %.2f s (%d × %.2f s); reconnecting",
                        now - self._last_recv,
                        self._liveness,
                        self._interval,
                    )
                return _End.LOST
            wait = min(MAX_POLL_S, self._last_recv + window - now)
            if self._welcomed:
                if now >= self._next_beat:
                    self._heartbeat(now)
                self._flush_outgoing()
                self.meter.expire(now, max(window, PROBE_TIMEOUT_S))
                wait = min(wait, self._next_beat - now)
            try:
                message = self.link.recv(max(wait, 0.0))
            except FrameError as exc:
                self._last_recv = self.clock()
                self.log.warning("malformed message from the aggregator dropped: %s", exc)
                continue
            if message is not None:
                self._last_recv = self.clock()
                try:
                    end = self._handle(message)
                except Exception:  # a bug or a disk fault must not end the daemon
                    self.log.exception("error handling %s; continuing", message.header.type)
                    continue
                if end is not None:
                    return end
        return _End.STOP

    def _send_hello(self) -> None:
        hello = Hello(
            agent_id=self.agent_id,
            versions=list(PROTOCOL_VERSIONS),
            software=f"edgefed-agent {_version()}",
            profile=self.profile,
            methods=sorted(self.methods)[:32],
            models=[self.model_sha256],
            holds=self.workspace.objects.holdings(),
            role=self.settings.role,
        )
        self._hello_id = hello.msg_id
        self.link.send(encode(hello))
        self.log.info("hello sent to %s", self.settings.link.endpoint)

    def _heartbeat(self, now: float) -> None:
        rtt_ms, mbps = self.meter.report()
        limit = self.settings.bandwidth_limit_mbps
        if limit is not None and mbps is not None:
            mbps = min(mbps, limit)
        if rtt_ms is not None:
            self.log.info(
                "link: rtt %.2f ms, upload %s Mbit/s",
                rtt_ms,
                "?" if mbps is None else f"{mbps:.1f}",
            )
        for task_id in [t for t in self._awaiting if not self.outbox.has(t)]:
            del self._awaiting[task_id]
        ready = list(self._awaiting)[:64]
        current = self.worker.current()
        if current is None:
            beat = Heartbeat(state="idle", rtt_ms=rtt_ms, bandwidth_mbps=mbps, ready=ready)
        else:
            assign, progress = current
            beat = Heartbeat(
                run_id=assign.run_id,
                round=assign.round,
                state="busy",
                task_id=assign.task_id,
                progress=progress,
                rtt_ms=rtt_ms,
                bandwidth_mbps=mbps,
                ready=ready,
            )
        self.link.send(encode(beat))
        self._next_beat = now + self._interval

    def _flush_outgoing(self) -> None:
        while True:
            try:
                item = self._outgoing.get_nowait()
            except queue.Empty:
                return
            if item.stored and (
                item.task_id in self._sent_this_session or not self.outbox.has(item.task_id)
            ):
                continue  # already resent from the outbox after Welcome, or already acked
            if item.stored and self._needs_grant(item.frames):
                self._await_grant(item.task_id)
                continue
            if not self.link.send(item.frames):
                what = "result stays in the outbox" if item.stored else "error reply dropped"
                self.log.warning("task %s: send queue full; %s", item.task_id, what)
                continue
            if item.stored:
                self._sent_this_session.add(item.task_id)
            self.log.debug("task %s: %s sent", item.task_id, "result" if item.stored else "error")

    def _needs_grant(self, frames: Sequence[Any]) -> bool:
        return self._grant_above is not None and frames_nbytes(frames) > self._grant_above

    def _await_grant(self, task_id: str) -> None:
        """Announce a large result in the next heartbeat (now) and send it when granted."""
        if task_id not in self._awaiting:
            self._awaiting[task_id] = None
            self._next_beat = self.clock()
            self.log.info("task %s: result ready; waiting for the aggregator's grant", task_id)

    def _on_grant(self, h: Grant) -> None:
        frames = self.outbox.get(h.task_id)
        self._awaiting.pop(h.task_id, None)
        if frames is None:
            return  # acked meanwhile
        if self.link.send(frames):
            self._sent_this_session.add(h.task_id)
            self.log.debug("task %s: granted result sent", h.task_id)
        else:
            self._await_grant(h.task_id)

    # ------------------------------------------------------------------------------ messages

    def _handle(self, message: Decoded) -> _End | None:
        h = message.header
        if isinstance(h, Welcome):
            return self._on_welcome(h)
        if isinstance(h, Heartbeat):
            if h.echo:
                probe = self.meter.on_echo(h.echo, self.clock())
                if probe is not None:
                    self.link.send(probe)
        elif isinstance(h, TaskAssign):
            if self._welcomed:
                self._on_assign(h, message.blobs)
            else:
                self.log.warning("%s: assigned before Welcome; ignored", task_tag(h))
        elif isinstance(h, Grant):
            self._on_grant(h)
        elif isinstance(h, Ack):
            self._awaiting.pop(h.task_id, None)
            if self.outbox.remove(h.task_id):
                how = "acknowledged" if h.accepted else "recorded but not accepted"
                self.log.info("task %s round %d: result %s", h.task_id, h.round, how)
        elif isinstance(h, ErrorReply):
            return self._on_error(h)
        elif isinstance(h, Bye):
            self.log.info("aggregator said bye (%s)", h.reason or "no reason")
            if self.settings.stop_on_bye:
                self._stop.set()
                return _End.STOP
            return _End.LOST
        else:
            self.log.warning("unexpected %s message from the aggregator ignored", h.type)
        return None

    def _on_welcome(self, h: Welcome) -> _End | None:
        if h.version not in PROTOCOL_VERSIONS:
            self.log.error("aggregator chose protocol version %d, not one of ours", h.version)
            return _End.REFUSED
        now = self.clock()
        self._welcomed = True
        self._interval, self._liveness = h.heartbeat_interval, h.liveness
        self._next_beat = now + self._interval
        self.backoff.reset()
        self.log.info(
            "welcomed: protocol v%d, heartbeat %.2f s, liveness %d",
            h.version,
            h.heartbeat_interval,
            h.liveness,
        )
        self._sent_this_session.clear()
        self._grant_above = h.grant_above
        self._awaiting.clear()
        pending = self.outbox.pending()
        for task_id, frames in pending:
            if self._needs_grant(frames):
                self._await_grant(task_id)
            elif self.link.send(frames):
                self._sent_this_session.add(task_id)
        if pending:
            unsent = len(pending) - len(self._sent_this_session) - len(self._awaiting)
            self.log.info(
                "resent %d results from the outbox (%d wait for a grant)",
                len(self._sent_this_session),
                len(self._awaiting),
            )
            if unsent:
                self.log.warning(
                    "%d results wait for the next connection (send queue full)", unsent
                )
        self.link.send(self.meter.start(now))
        return None

    def _on_assign(self, h: TaskAssign, blobs: Mapping[str, memoryview]) -> None:
        tag = task_tag(h)
        stored = self.outbox.get(h.task_id)
        if stored is not None:
            self.log.info("%s: already done; resending the stored result", tag)
            if self.link.send(stored):
                self._sent_this_session.add(h.task_id)
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
            params = parse_params(h.method, h.params)
        except ProtocolError as exc:
            self.log.warning("%s: rejected: %s", tag, exc)
            self.link.send(error_reply(h, exc.code, str(exc)))
            return
        self.worker.submit(Job(assign=h, params=params, blobs=blobs))
        self.log.info("%s: %s %s queued", tag, h.method, h.kind)

    def _on_error(self, h: ErrorReply) -> _End | None:
        # An answer to our Hello (by ref, or with no ref at all): not to a heartbeat still in
        # flight from before, which a restarted aggregator answers with UNKNOWN_AGENT too.
        answers_hello = h.ref == self._hello_id or (not h.ref and not h.task_id)
        if not self._welcomed and answers_hello and h.code in REFUSALS:
            self.log.error("aggregator refused this agent: %s: %s", h.code.value, h.reason)
            return _End.REFUSED
        if h.task_id and h.code in DROPS:
            dropped = self.outbox.remove(h.task_id)
            self.log.warning(
                "task %s round %d: %s: %s%s",
                h.task_id,
                h.round,
                h.code.value,
                h.reason,
                "; result removed from the outbox" if dropped else "",
            )
            return None
        if h.code is ErrorCode.UNKNOWN_AGENT and self._welcomed:
            self.log.warning("aggregator no longer knows this agent; saying hello again")
            self._welcomed = False
            self._send_hello()
            return None
        self.log.warning("aggregator error %s: %s", h.code.value, h.reason)
        return None


def _collect_profile(config: AgentConfig) -> Profile:
    from edge_agent.profile import collect_profile

    data = collect_profile(measure=True, disk_path=config.agent.state_dir)
    a = config.agent
    if a.memory_limit is not None:
        for key in ("ram_total", "ram_available"):
            data[key] = min(cast(int, data[key]), a.memory_limit)
    if a.bandwidth_limit_mbps is not None:
        data["bandwidth_mbps"] = a.bandwidth_limit_mbps
    try:
        return Profile.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        raise EdgeAgentError(f"machine profile is invalid: {exc.errors()[0]['msg']}") from None


def _version() -> str:
    try:
        return metadata.version("edgefed")
    except metadata.PackageNotFoundError:
        return "dev"
