"""The aggregator service: a ROUTER socket around the sans-IO round engine.

The loop polls the socket, decodes each message (a malformed one gets an ErrorReply and is
otherwise ignored), checks that the connection's identity and CURVE User-Id match the agent the
message claims to be, hands it to the engine, and sends what the engine returns. Large blobs go
out zero-copy. The loop ends when the run is finished or ``should_exit`` is set.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth

from aggregator.engine.engine import Outgoing, RoundEngine, RoundSummary
from aggregator.errors import ConfigError, StateError
from aggregator.methods import ServerMethod, context_of, server_methods
from aggregator.ops.config import AggregatorConfig
from aggregator.ops.metrics import ServiceMetrics
from aggregator.ops.security import AllowListAuthenticator, start_curve_server
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import decode, encode
from protocol.messages import BaseModelRef, Bye, ErrorReply, TaskResult

log = logging.getLogger(__name__)
POLL_MS = 50


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
    ) -> None:
        """``method``, ``driven`` and ``on_phase`` make a regional tier (aggregator.tier.regional)."""
        self.config = config
        state = config.server.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if method is None:
            factories = server_methods()
            if config.run.method not in factories:
                raise ConfigError(
                    f"unknown method {config.run.method!r}; known: {sorted(factories)}"
                )
            method = factories[config.run.method](config.method, context_of(config))
        self.method = method
        self.ledger = Ledger(state / "ledger.sqlite")
        self.store = CheckpointStore(state / "checkpoints", keep=config.server.keep_checkpoints)
        self.metrics = ServiceMetrics()
        self.metrics.time_storage(self.ledger, self.store)
        user_on_round = on_round if callable(on_round) else None

        def round_done(summary: RoundSummary) -> None:
            self.metrics.round_done(summary)
            if user_on_round is not None:
                user_on_round(summary)

        self.engine = RoundEngine(
            config,
            self.method,
            model,
            ledger=self.ledger,
            store=self.store,
            on_round=round_done,
            driven=driven,
            on_phase=on_phase,
        )
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.bye_on_exit = driven
        self.should_exit = threading.Event()
        self.bound = threading.Event()
        self.endpoint = ""
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth: AllowListAuthenticator | None = None
        self.dropped = 0

    def _socket(self) -> zmq.Socket[bytes]:
        server = self.config.server
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, server.hwm)
        sock.setsockopt(zmq.RCVHWM, server.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, server.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 2000)
        sec = self.config.security
        if sec.insecure:
            log.warning(
                "INSECURE: CURVE is off; anyone who reaches %s can join and read updates",
                server.bind,
            )
        else:
            assert sec.secret_key is not None and sec.allow_dir is not None
            self.auth = start_curve_server(self.ctx, sock, sec.secret_key, sec.allow_dir)
        try:
            sock.bind(server.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind {server.bind}: {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _send(self, sock: zmq.Socket[bytes], out: Outgoing) -> None:
        frames = out.frames()
        try:
            sock.send_multipart([out.agent_id.encode(), *frames], copy=False, flags=zmq.NOBLOCK)
            self.metrics.sent(frames)
        except zmq.Again:
            log.warning("agent %s: send queue full, message dropped", out.agent_id)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
            log.info("agent %s unreachable: %s", out.agent_id, exc)

    def _authorised(self, agent_id: str, frame: zmq.Frame) -> bool:
        if self.auth is None:
            return True
        self.auth.maybe_reload()
        user_id = frame.get("User-Id") or ""
        return bool(user_id) and user_id == agent_id and agent_id in self.auth.allowed_ids()

    def _handle(self, sock: zmq.Socket[bytes], frames: list[zmq.Frame], now: float) -> None:
        identity = bytes(frames[0].buffer)
        self.metrics.received(frames[1:])
        try:
            agent_id = identity.decode("ascii")
        except UnicodeDecodeError:
            self.dropped += 1
            return
        if not self._authorised(agent_id, frames[1] if len(frames) > 1 else frames[0]):
            log.warning("connection %r: User-Id does not match or key revoked; refused", agent_id)
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
        try:
            msg = decode(frames[1:])
        except FrameError as exc:
            self.dropped += 1
            log.warning("agent %s: malformed message: %s", agent_id, exc)
            self._send(sock, Outgoing(agent_id, ErrorReply(code=exc.code, reason=str(exc))))
            return
        try:
            replies = self.engine.on_message(agent_id, msg, now)
            self.metrics.answered(msg.header, replies)
            for out in replies:
                self._send(sock, out)
        except ProtocolError as exc:
            if isinstance(msg.header, TaskResult):
                self.metrics.refused(exc.code)
            log.warning("agent %s: %s", agent_id, exc)
            self._send(sock, Outgoing(agent_id, ErrorReply(code=exc.code, reason=str(exc))))
        except StateError:
            raise  # the ledger or checkpoints failed: stop rather than run on without durability
        except Exception:  # the message boundary: one bad message never stops the service
            log.exception("agent %s: internal error on %s", agent_id, msg.header.type)
            reply = ErrorReply(
                code=ErrorCode.INTERNAL, reason="internal error; see the aggregator log"
            )
            self._send(sock, Outgoing(agent_id, reply))

    def _self_test(self, sock: zmq.Socket[bytes], wait_s: float = 1.0) -> list[list[zmq.Frame]]:
        """Connect with a key that is on no allow-list; refuse to serve if it gets through.

        Messages other peers send meanwhile are returned, to be handled once serving starts.
        """
        endpoint = re.sub(r"^tcp://(\*|0\.0\.0\.0)(?=:)", "tcp://127.0.0.1", self.endpoint)
        probe_id = f"self-test-{os.getpid()}".encode()
        public, secret = zmq.curve_keypair()
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
                self._handle(sock, frames, time.monotonic())
            self._loop(sock)
        finally:
            sock.close(linger=1000)
            if self.auth is not None:
                self.auth.stop()
            self.ledger.close()
            self.ctx.term()
            self.metrics.close()
        return 0

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the service's loop thread (the engine is not thread-safe)."""
        self._calls.put(fn)

    def _loop(self, sock: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self.should_exit.is_set():
            while not self._calls.empty():
                self._calls.get()()
            events = dict(poller.poll(POLL_MS))
            if sock in events:
                for _ in range(256):  # drain a burst, then let the clock run
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(sock, frames, time.monotonic())
            for out in self.engine.tick(time.monotonic()):
                self._send(sock, out)
            self.metrics.live_agents(len(self.engine.registry.live()))
            if self.engine.finished:
                for out in self.engine.goodbye():
                    self._send(sock, out)
                return
        if self.bye_on_exit:
            for out in self.engine.goodbye():
                self._send(sock, out)

    def export(self, out_dir: Path) -> dict[str, Path]:
        """The result under ``out_dir/<kind>`` (see :mod:`aggregator.store.export_layout`)."""
        from aggregator.store.export_layout import export_result

        run = self.config.run
        return export_result(
            self.method, run.method, out_dir, model=run.model, model_dir=run.model_dir
        )


__all__ = ["AggregatorService", "RoundSummary"]
