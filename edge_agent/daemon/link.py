"""The agent's end of the wire: a DEALER socket, reconnect backoff and link measurements.

Only the link thread (:class:`edge_agent.daemon.daemon.Daemon`) calls :class:`Link`. The socket is a
DEALER whose ``ROUTING_ID`` is the agent id, so the aggregator's ROUTER addresses the agent by
name across reconnects (Paranoid Pirate, zguide ``ppworker``). Every frame the agent sends is a
message of :mod:`protocol.frames` (``[b"EFED/1"] [header JSON] [blob ...]``); the ROUTER sees the
routing id in front of it.

:class:`Backoff` and :class:`LinkMeter` are sans-IO: they take a clock reading and return delays
or messages; the daemon does the sending.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from edge_agent.errors import ConfigError
from protocol.frames import Buffer, Decoded, decode, encode
from protocol.messages import Heartbeat

logger = logging.getLogger(__name__)

LINGER_MS = 200
"""How long ``close`` waits to flush what is queued (a Bye); results are safe in the outbox."""
HWM = 64
MAX_MESSAGE_BYTES = 2 << 30
"""Largest inbound frame accepted (a FedBiOT emulator of a small model fits)."""
PROBE_BYTES = 1 << 20
PROBE_BLOB = "probe"


class AgentLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the agent id: ``[edge-1] task t-3 round 2: ...``."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{(self.extra or {}).get('agent', '?')}] {msg}", kwargs


def agent_log(log: logging.Logger, agent_id: str) -> AgentLog:
    return AgentLog(log, {"agent": agent_id})


@dataclass(frozen=True)
class CurveKeys:
    """CURVE client keys (Z85 bytes): this agent's pair and the aggregator's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_key: Path, server_public_key: Path) -> CurveKeys:
        """Read key files written by ``edgefed-agent keygen`` / ``edgefed-aggregator keygen``."""
        try:
            public, secret = zmq.auth.load_certificate(secret_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{secret_key}: cannot read the agent's secret key ({exc})") from None
        if not secret:
            raise ConfigError(f"{secret_key}: holds no secret key (use the .key_secret file)")
        try:
            server, _ = zmq.auth.load_certificate(server_public_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{server_public_key}: cannot read the aggregator's public key ({exc})"
            ) from None
        return cls(public=public, secret=secret, server=server)


@dataclass(frozen=True)
class LinkSettings:
    agent_id: str
    endpoint: str
    curve: CurveKeys | None
    reconnect_min: float = 1.0
    reconnect_max: float = 32.0


class Link:
    """The DEALER socket. ``open`` → ``send``/``recv`` → ``close``, then ``open`` again."""

    def __init__(self, settings: LinkSettings, context: zmq.Context[Any] | None = None) -> None:
        self.settings = settings
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        self._poller = zmq.Poller()
        self.log = agent_log(logger, settings.agent_id)

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    def open(self) -> None:
        if self._socket is not None:
            return
        s = self.settings
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, s.agent_id.encode())
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, int(s.reconnect_min * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(s.reconnect_max * 1000))
        if s.curve is not None:
            sock.curve_secretkey = s.curve.secret
            sock.curve_publickey = s.curve.public
            sock.curve_serverkey = s.curve.server
        sock.connect(s.endpoint)
        self._socket = sock
        self._poller.register(sock, zmq.POLLIN)
        self.log.debug("connecting to %s (%s)", s.endpoint, "CURVE" if s.curve else "insecure")

    def close(self) -> None:
        if self._socket is None:
            return
        self._poller.unregister(self._socket)
        self._socket.close()
        self._socket = None

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Queue a message without blocking; False when the send queue is full (HWM)."""
        if self._socket is None:
            return False
        try:
            self._socket.send_multipart(list(frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_s: float) -> Decoded | None:
        """The next message, waiting at most ``timeout_s``; None on timeout.

        A malformed message raises :class:`protocol.errors.FrameError` (it still proves the
        aggregator is alive).
        """
        if self._socket is None:
            return None
        ready = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        if self._socket not in ready:
            return None
        frames = self._socket.recv_multipart(copy=False)
        return decode(frames)


class Backoff:
    """Reconnect delays: ``low`` doubling up to ``high``, each with ±25% jitter."""

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low, self.high = low, high
        self._current = low
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self._current * self._rng.uniform(0.75, 1.25)
        self._current = min(self._current * 2, self.high)
        return delay

    def reset(self) -> None:
        self._current = self.low


class LinkMeter:
    """RTT and upload bandwidth from two probes answered at once by the aggregator.

    ``start`` returns an empty probe; its echo gives the RTT and triggers a probe carrying
    ``PROBE_BYTES`` random bytes, whose echo time minus the RTT is the upload time. ``report``
    hands out the measurements once (for the next heartbeat). A probe not echoed within
    ``timeout`` is abandoned.
    """

    def __init__(self, probe_bytes: int = PROBE_BYTES) -> None:
        self.probe_bytes = probe_bytes
        self._waiting: tuple[str, str, float] | None = None  # (msg_id, kind, sent_at)
        self.rtt_s: float | None = None
        self.bandwidth_mbps: float | None = None
        self._report_due = False

    def start(self, now: float) -> list[Buffer]:
        self.rtt_s = self.bandwidth_mbps = None
        probe = Heartbeat(probe=True)
        self._waiting = (probe.msg_id, "rtt", now)
        return encode(probe)

    def on_echo(self, echo: str, now: float) -> list[Buffer] | None:
        """Feed an aggregator heartbeat's ``echo``; may return the next probe to send."""
        if self._waiting is None or echo != self._waiting[0]:
            return None
        _, kind, sent = self._waiting
        elapsed = max(now - sent, 1e-6)
        if kind == "rtt":
            self.rtt_s = elapsed
            probe = Heartbeat(probe=True)
            self._waiting = (probe.msg_id, "bandwidth", now)
            return encode(probe, {PROBE_BLOB: os.urandom(self.probe_bytes)})
        transfer = elapsed - (self.rtt_s or 0.0)
        if transfer <= elapsed * 0.05:  # loopback: the RTT estimate swamps the transfer
            transfer = elapsed
        self.bandwidth_mbps = self.probe_bytes * 8 / transfer / 1e6
        self._waiting = None
        self._report_due = True
        return None

    def expire(self, now: float, timeout: float) -> None:
        if self._waiting is not None and now - self._waiting[2] > timeout:
            logger.info("link probe not answered within %.1f s; measurements skipped", timeout)
            self._waiting = None
            self._report_due = self.rtt_s is not None

    def report(self) -> tuple[float | None, float | None]:
        """(rtt_ms, bandwidth_mbps) for the next heartbeat, once; then (None, None)."""
        if not self._report_due:
            return None, None
        self._report_due = False
        rtt_ms = self.rtt_s * 1000.0 if self.rtt_s is not None else None
        return rtt_ms, self.bandwidth_mbps
