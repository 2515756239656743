"""The aggregator service: a ROUTER socket around the sans-IO round engine.

The loop polls the socket, checks that the connection's identity and CURVE User-Id match the
agent the message claims to be and the key now listed for it (:class:`Sessions`), hands the
message to the :class:`MessageBoundary` (decode, engine, an ErrorReply for anything that fails:
no message stops the service), and sends the replies. Large blobs go out zero-copy. The loop
ends when the run is finished or ``should_exit`` is set.

With ``serve_runs`` (``edgefed-aggregator serve``) the service outlives its runs: a
:class:`~aggregator.runs.lifecycle.Lifecycle` swaps engines as runs end and start, and the admin
socket (:mod:`aggregator.runs.admin`) takes ``runs submit | list | stop | show``; the loop ends only
on ``should_exit`` (SIGTERM), after telling the agents with a ``Bye`` that carries no run id.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from aggregator.engine.boundary import MessageBoundary
from aggregator.engine.engine import Outgoing, RoundEngine, RoundSummary
from aggregator.engine.pipeline import DecodeAhead, Decoder
from aggregator.errors import ConfigError, StateError
from aggregator.methods import ServerMethod, context_of, server_methods
from aggregator.ops.config import AggregatorConfig, ServerSection
from aggregator.ops.metrics import ServiceMetrics
from aggregator.ops.security import AllowListAuthenticator, start_curve_server
from aggregator.ops.sessions import Sessions
from aggregator.privacy.wrap import private_method
from aggregator.runs.admin import AdminServer, admin_request
from aggregator.runs.lifecycle import Lifecycle
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from aggregator.store.statedir import StateDirLock, check_writable
from protocol.errors import ErrorCode
from protocol.frames import encode
from protocol.messages import BaseModelRef, Bye, ErrorReply, TaskResult

log = logging.getLogger(__name__)
OVERLAP_MAX_S = 0.05
"""The longest the loop goes on taking bursts while a group syncs before it runs the clock
(heartbeats, deadlines: :meth:`RoundEngine.tick`, which flushes)."""
POLL_MS = 50


def configure_router(sock: zmq.Socket[bytes], server: ServerSection) -> None:
    """The service ROUTER's options.

    No ``ROUTER_HANDOVER``: a connection cannot take over a connected agent's routing id. A dead
    peer's connection is dropped by TCP keepalive (idle for the run's heartbeat interval ×
    liveness, then probed every interval, three times), so an agent that reconnects is not locked
    out by its own dead connection. Not by ZMTP heartbeats: in libzmq 4.3.5 a peer that fills its
    receive queue (``hwm`` messages the service has not read yet) and then hangs up leaves its
    engine in an I/O-error state, and the next ZMTP ping aborts the whole process
    (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``): any allowed agent could
    kill the service that way, and a slow round did it by accident.
    """
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    idle = max(1, math.ceil(server.heartbeat_interval * server.liveness))
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, idle)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, math.ceil(server.heartbeat_interval)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    sock.setsockopt(zmq.SNDHWM, server.hwm)
    sock.setsockopt(zmq.RCVHWM, server.hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, server.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 2000)


class AggregatorService:
    def __init__(
        self,
        config: AggregatorConfig,
        model: BaseModelRef,
        *,
        on_round: object = None,
        method: ServerMethod | None = None,
        driven: bool = False,
        on_phase: Callable[[str, int, list[TaskResult]], None] | None = None,
        serve_runs: bool = False,
        exit_when_done: bool = False,
    ) -> None:
        """``method``, ``driven`` and ``on_phase`` make a regional tier (aggregator.tier.regional);
        ``serve_runs``: stay up across runs (``serve``), see the module docstring;
        ``exit_when_done``: with it, end once no run is active or queued (batch use)."""
        self.config = config
        state = config.server.state_dir
        check_writable(state)  # a read-only state dir: one clear error before SQLite opens it
        self.lock = StateDirLock(state)  # one aggregator per state dir
        try:
            self._open(config, model, on_round, method, driven, on_phase, serve_runs)
        except BaseException:
            self.lock.release()
            raise
        self.exit_when_done = exit_when_done
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.bye_on_exit = driven
        self.should_exit = threading.Event()
        self.bound = threading.Event()
        self.endpoint = ""
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth: AllowListAuthenticator | None = None
        self.boundary = MessageBoundary(self.engine, self.metrics)
        self.decode_ahead = DecodeAhead()
        self.sessions = Sessions(None)

    def _open(
        self,
        config: AggregatorConfig,
        model: BaseModelRef,
        on_round: object,
        method: ServerMethod | None,
        driven: bool,
        on_phase: Callable[[str, int, list[TaskResult]], None] | None,
        serve_runs: bool,
    ) -> None:
        """The ledger, the metrics and the first engine (``__init__``'s part that may fail
        once the state dir is locked)."""
        state = config.server.state_dir
        self.model = model
        self.ledger = Ledger(state / "ledger.sqlite")
        self.metrics = ServiceMetrics()
        self.metrics.time_storage(ledger=self.ledger)
        user_on_round = on_round if callable(on_round) else None

        def round_done(summary: RoundSummary) -> None:
            self.metrics.round_done(summary)
            if user_on_round is not None:
                user_on_round(summary)

        self._on_round = round_done
        self._driven, self._on_phase = driven, on_phase
        self.lifecycle: Lifecycle | None = None
        self.admin: AdminServer | None = None
        try:
            if serve_runs:
                from aggregator.runs.state import RunBook

                self.lifecycle = Lifecycle(RunBook(self.ledger, state), self._build, self._export)
                self.engine = self.lifecycle.adopt(config)
            else:
                self.engine = self._build(config, False, method)
        except BaseException:
            self.ledger.close()
            raise

    @property
    def dropped(self) -> int:
        """Messages that were not decoded (not ASCII-identified, or malformed)."""
        return self.boundary.dropped

    def _build(
        self, config: AggregatorConfig, start: bool, method: ServerMethod | None = None
    ) -> RoundEngine:
        """The engine of ``config``'s run (started if ``start``)."""
        if method is None:
            factories = server_methods()
            if config.run.method not in factories:
                raise ConfigError(
                    f"unknown method {config.run.method!r}; known: {sorted(factories)}"
                )
            method = factories[config.run.method](config.method, context_of(config))
            method = private_method(method, config)
        self.method = method
        state = config.server.state_dir
        self.store = CheckpointStore(state / "checkpoints", keep=config.server.keep_checkpoints)
        self.metrics.time_storage(store=self.store)
        model = self.model if self.lifecycle is None else _model_of(config)
        engine = RoundEngine(
            config,
            method,
            model,
            ledger=self.ledger,
            store=self.store,
            on_round=self._on_round,
            driven=self._driven,
            on_phase=self._on_phase,
        )
        if start:
            engine.start()
        return engine

    def _export(self, engine: RoundEngine) -> None:
        """A finished run's result under ``run.export_dir/<kind>``, as ``export --out`` lays it."""
        from aggregator.store.export_layout import KINDS, export_result

        run = engine.config.run
        if run.export_dir is not None:
            written = export_result(
                engine.method, run.method, run.export_dir, model=run.model, model_dir=run.model_dir
            )
            kind = KINDS.get(run.method, "adapter")
            log.info("run %s exported (%s): %s", engine.run_id, kind, written[kind])

    def _socket(self) -> zmq.Socket[bytes]:
        server = self.config.server
        sock = self.ctx.socket(zmq.ROUTER)
        configure_router(sock, server)
        sec = self.config.security
        if sec.insecure:
            log.warning(
                "INSECURE: CURVE is off; anyone who reaches %s can join and read updates",
                server.bind,
            )
        else:
            assert sec.secret_key is not None and sec.allow_dir is not None
            self.auth = start_curve_server(self.ctx, sock, sec.secret_key, sec.allow_dir)
            self.sessions = Sessions(self.auth)
        try:
            sock.bind(server.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind {server.bind}: {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _send(self, sock: zmq.Socket[bytes], out: Outgoing) -> None:
        try:
            frames = out.frames()
        except Exception:  # a reply that cannot be encoded is a bug: log it, serve on
            log.exception("agent %s: reply %s could not be encoded", out.agent_id, out.header)
            return
        try:
            sock.send_multipart([out.agent_id.encode(), *frames], copy=False, flags=zmq.NOBLOCK)
            self.metrics.sent(frames)
        except zmq.Again:
            self.boundary.quiet.warn(
                f"{out.agent_id}\0full", "agent %s: send queue full, message dropped", out.agent_id
            )
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
            log.info("agent %s unreachable: %s", out.agent_id, exc)

    def _authorised(self, agent_id: str, frame: zmq.Frame) -> bool:
        if self.auth is None:
            return True
        return self.sessions.authorised(agent_id, frame)

    def _drop_revoked(self) -> None:
        """Re-read the allow-list when due; forget the agents whose key left it."""
        for agent_id in self.sessions.refresh():
            self.engine.registry.gone(agent_id)

    def _handle(
        self,
        sock: zmq.Socket[bytes],
        frames: list[zmq.Frame],
        now: float,
        decoded: Decoder | None = None,
    ) -> None:
        identity = bytes(frames[0].buffer)
        self.metrics.received(frames[1:])
        try:
            agent_id = identity.decode("ascii")
        except UnicodeDecodeError:
            self.boundary.dropped += 1
            return
        if not self._authorised(agent_id, frames[1] if len(frames) > 1 else frames[0]):
            assert self.auth is not None
            self.auth.refusals.refused(
                f"connection {agent_id!r}", "its CURVE key's agent id does not match, or revoked"
            )
            self._send(
                sock,
                Outgoing(
                    agent_id,
                    ErrorReply(
                        code=ErrorCode.IDENTITY_MISMATCH, reason="not authorised as this agent"
                    ),
                ),
            )
            return
        for out in self.boundary.handle(agent_id, frames[1:], now, decoded):
            self._send(sock, out)

    def _receive(
        self,
        sock: zmq.Socket[bytes],
        frames: list[zmq.Frame],
        now: float,
        decoded: Decoder | None = None,
    ) -> None:
        """The outermost guard: nothing one message causes stops the loop but a StateError."""
        try:
            self._handle(sock, frames, now, decoded)
        except StateError:
            raise
        except Exception:
            log.exception("a message could not be handled; the service runs on")

    def _self_test(self, sock: zmq.Socket[bytes], wait_s: float = 1.0) -> list[list[zmq.Frame]]:
        """Connect with a key that is on no allow-list; refuse to serve if it gets through.

        Messages other peers send meanwhile are returned, to be handled once serving starts.
        """
        endpoint = re.sub(r"^tcp://(\*|0\.0\.0\.0)(?=:)", "tcp://127.0.0.1", self.endpoint)
        probe_id = f"self-test-{os.getpid()}".encode()
        public, secret = zmq.curve_keypair()
        if self.auth is not None:  # its refusal is the point: not an operator's concern
            self.auth.expected_refusals = self.auth.expected_refusals | {z85.decode(public)}
        client = self.ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.SNDTIMEO, 1000)
        client.setsockopt(zmq.ROUTING_ID, probe_id)
        client.curve_publickey = public
        client.curve_secretkey = secret
        assert self.config.security.secret_key is not None
        client.curve_serverkey = zmq.auth.load_certificate(self.config.security.secret_key)[0]
        client.connect(endpoint)
        backlog: list[list[zmq.Frame]] = []
        try:
            client.send_multipart(encode(Bye(reason="self-test")))
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                if not sock.poll(int(left * 1000) + 1):
                    continue
                frames = sock.recv_multipart(copy=False)
                if bytes(frames[0].buffer) == probe_id:
                    raise ConfigError(
                        "start-up self-test failed: a client with an unknown CURVE key got a "
                        "message through; refusing to serve"
                    )
                backlog.append(frames)
        except zmq.Again:
            pass  # the handshake was refused before the message could even be queued
        finally:
            client.close(linger=0)
        log.info("self-test passed: an unknown CURVE key was refused")
        return backlog

    def run(self) -> int:
        """Serve until the run is finished or ``should_exit``; return an exit code."""
        if self.lifecycle is None:
            self.engine.start()
        server = self.config.server
        if server.metrics_port is not None:
            try:
                self.metrics.serve(server.metrics_port, server.metrics_host)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {server.metrics_host}:{server.metrics_port}: {exc}"
                ) from None
        sock = self._socket()
        if self.lifecycle is not None:
            self.admin = AdminServer(self.ctx, self.config.server.state_dir, self._admin)
        try:
            backlog = self._self_test(sock) if self.auth is not None else []
            self.bound.set()
            log.info(
                "aggregator listening on %s (run %s, method %s)",
                self.endpoint,
                self.engine.run_id,
                self.config.run.method,
            )
            for frames in backlog:
                self._receive(sock, frames, time.monotonic())
            self._loop(sock)
        finally:  # every step runs, whatever the one before raised (the error that ended
            # the loop is what propagates)
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("the socket", lambda: sock.close(linger=1000)),
                ("the admin channel", self.admin.close if self.admin is not None else _nothing),
                ("the authenticator", self.auth.stop if self.auth is not None else _nothing),
                ("the decoders", self.decode_ahead.close),
                (f"run {self.engine.run_id}'s engine", self.engine.close),
                ("the ledger", self.ledger.close),
                ("the ZeroMQ context", self.ctx.term),
                ("the metrics endpoint", self.metrics.close),
                ("the state dir's lock", self.lock.release),
            ]
            for what, close in steps:
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", what)
        return 0

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the service's loop thread (the engine is not thread-safe)."""
        self._calls.put(fn)

    def _loop(self, sock: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self.admin is not None:
            poller.register(self.admin.socket, zmq.POLLIN)
        self._sock = sock
        last_tick = time.monotonic()
        # messages taken while the group before was handled, their decoding under way
        ahead: list[tuple[list[zmq.Frame], Decoder | None]] = []
        while not self.should_exit.is_set():
            while not self._calls.empty():
                self._calls.get()()
            self._drop_revoked()  # on the loop's clock: a new key is admitted with no traffic
            events = dict(poller.poll(0 if ahead else POLL_MS))
            if sock in events or ahead:
                # drain a burst as one group: its updates become durable together (one sync,
                # one ledger transaction), then their Acks go out; then the clock runs
                burst, ahead = ahead, []
                fresh: list[list[zmq.Frame]] = []
                while len(burst) + len(fresh) < 256:
                    try:
                        fresh.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                # decoded ahead on a worker while the loop handles the messages before them
                decoders = self.decode_ahead.burst([frames[1:] for frames in fresh])
                burst += zip(fresh, decoders, strict=True)
                with self.engine.group(overlap=True) as acks:  # the group before's Acks
                    for frames, decoded in burst:
                        self._take_ahead(sock, ahead)
                        self._receive(sock, frames, time.monotonic(), decoded)
                self.metrics.acked(acks)
                for out in acks:
                    self._send(sock, out)
                # this group's sync runs while the next burst, if it is here already, is taken
                # (its Acks come with that one's end); otherwise the tick below flushes it
                if (
                    self.engine.syncing
                    and (ahead or sock.poll(0))
                    and time.monotonic() - last_tick < OVERLAP_MAX_S
                ):
                    continue
            if self.engine.syncing:
                # nothing more to take now: this group's Acks go out before the clock runs, so
                # a round's close (aggregation, checkpoint, the next round) never delays them
                outs = self.engine.flush()
                self.metrics.acked(outs)
                for out in outs:
                    self._send(sock, out)
            if self.admin is not None and self.admin.socket in events:
                self.admin.serve_one()
            last_tick = time.monotonic()
            if self.lifecycle is not None:
                self._step(sock)
                continue
            outs = self.engine.tick(last_tick)
            self.metrics.acked(outs)  # a group's that was still syncing (the tick flushes)
            for out in outs:
                self._send(sock, out)
            self.metrics.live_agents(len(self.engine.registry.live()))
            if self.engine.finished:
                for out in self.engine.goodbye():
                    self._send(sock, out)
                return
        outs = self.engine.flush()  # a group still syncing when asked to exit
        self.metrics.acked(outs)
        for out in outs:
            self._send(sock, out)
        if self.lifecycle is not None:
            active = self.lifecycle.active
            log.info(
                "shutting down: %d agents told; %s",
                len(self.engine.registry.live()),
                f"run {active} resumes on restart" if active else "no run was active",
            )
            for agent_id in self.engine.registry.live():
                self._send(sock, Outgoing(agent_id, Bye(reason="aggregator shutting down")))
        elif self.bye_on_exit:
            for out in self.engine.goodbye():
                self._send(sock, out)

    def _take_ahead(
        self, sock: zmq.Socket[bytes], ahead: list[tuple[list[zmq.Frame], Decoder | None]]
    ) -> None:
        """Take what has arrived meanwhile (up to a burst's 256), its decoding (the sha256 of a
        large update) started on the worker now: it opens the next group, already hashed."""
        while len(ahead) < 256:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ahead.append((frames, self.decode_ahead.start(frames[1:])))

    def _step(self, sock: zmq.Socket[bytes]) -> None:
        """One tick of a serving aggregator: the engine's clock, then the run lifecycle."""
        assert self.lifecycle is not None
        now = time.monotonic()
        try:
            outs = self.engine.tick(now)
            self.metrics.acked(outs)  # a group's that was still syncing (the tick flushes)
        except StateError:
            raise
        except Exception as exc:  # the run cannot go on; the service and the next runs can
            log.exception("run %s: round engine failed", self.engine.run_id)
            self.lifecycle.fail(exc)
            outs = self.engine.goodbye("run failed")
        for out in outs + self.lifecycle.step(now):
            self._send(sock, out)
        self.engine = self.lifecycle.engine or self.engine
        self.boundary.engine = self.engine
        if self.exit_when_done and self.lifecycle.active is None:
            log.info("no run active or queued; exiting (--exit-when-done)")
            self.should_exit.set()

    def _admin(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one admin request (on the loop thread)."""
        assert self.lifecycle is not None
        outs, reply = admin_request(self.lifecycle, self.config, request)
        for out in outs:
            self._send(self._sock, out)
        self.engine = self.lifecycle.engine or self.engine
        self.boundary.engine = self.engine
        return reply

    def export(self, out_dir: Path) -> dict[str, Path]:
        """The result under ``out_dir/<kind>`` (see :mod:`aggregator.store.export_layout`)."""
        from aggregator.store.export_layout import export_result

        run = self.engine.config.run
        return export_result(
            self.engine.method, run.method, out_dir, model=run.model, model_dir=run.model_dir
        )


def _nothing() -> None:
    pass


def _model_of(config: AggregatorConfig) -> BaseModelRef:
    """The base model a run trains: ``run.model_sha256``, else the hash of ``run.model_dir``."""
    sha = config.run.model_sha256
    if sha is None:
        if config.run.model_dir is None:
            raise ConfigError("run.model_sha256 (or run.model_dir to hash) is required")
        from aggregator.store.modelhash import weights_sha256

        sha = weights_sha256(config.run.model_dir)
    return BaseModelRef(name=config.run.model, sha256=sha)


__all__ = ["AggregatorService", "RoundSummary"]
