"""Sessions bound to the CURVE key that opened them.

Each message's ZAP ``User-Id`` names the authenticated key: ``<agent id>#<key fingerprint>``
(:mod:`aggregator.ops.security`). A message is the agent's only if its connection's routing id is
that agent id *and* that agent's file lists that very key now; the key a session authenticated
with is remembered, so that when the allow-list is re-read, the sessions whose key left it
(a removed file, or a rotated key: the file overwritten with a new one) are dropped at once,
not at their next message: the agent is forgotten and its TCP connection is shut down (found by
the ``SRCFD`` of its last message and checked by peer address, so a reused descriptor is never
touched). Its ZeroMQ peer then reconnects, and the ZAP handler refuses the old key. Without CURVE (``--insecure``) there is no key: every routing id is
taken at its word.

Routing ids are bound to keys on the socket too: the service's ROUTER runs without
``ROUTER_HANDOVER``, so a second connection presenting a routing id already connected is ignored
by ZeroMQ (it can neither take the victim's replies nor make it expire), and TCP keepalive
drops a dead peer's connection, so an agent that reconnects is not locked out by its own dead one
(not ZMTP heartbeats: see :func:`aggregator.engine.service.configure_router`).
"""

from __future__ import annotations

import logging
import socket

import zmq

from aggregator.ops.security import AllowListAuthenticator

log = logging.getLogger(__name__)


class Sessions:
    """The key each agent's session authenticated with, checked on every message."""

    def __init__(self, auth: AllowListAuthenticator | None) -> None:
        self.auth = auth
        self.keys: dict[str, str] = {}  # agent id -> fingerprint of its session's key
        self.conns: dict[str, tuple[int, object]] = {}  # agent id -> (fd, peer address)

    def authorised(self, agent_id: str, frame: zmq.Frame) -> bool:
        """Whether a message on connection ``agent_id`` (``frame``: its first frame, which
        carries the ZAP User-Id and the connection's descriptor) is that agent's."""
        if self.auth is None:
            return True
        user_id = frame.get("User-Id")
        name, _, key = (user_id if isinstance(user_id, str) else "").rpartition("#")
        if not name or name != agent_id or not self.auth.listed(agent_id, key):
            return False
        if self.keys.get(agent_id) != key:
            log.info("agent %s: session bound to key %s", agent_id, key)
            self.keys[agent_id] = key
        fd = _srcfd(frame)
        if fd is not None and self.conns.get(agent_id, (None,))[0] != fd:
            self.conns[agent_id] = (fd, _peer(fd))
        return True

    def refresh(self) -> list[str]:
        """Re-read the allow-list when due; return the agents whose session key left it (their
        sessions are forgotten: the caller drops them)."""
        if self.auth is None or not self.auth.maybe_reload():
            return []
        gone = [a for a, key in self.keys.items() if not self.auth.listed(a, key)]
        for agent_id in gone:
            del self.keys[agent_id]
            conn = self.conns.pop(agent_id, None)
            closed = conn is not None and _shut_down(*conn)
            log.warning(
                "agent %s: its key left the allow-list; session dropped%s",
                agent_id,
                " and connection closed" if closed else "",
            )
        return gone


def _srcfd(frame: zmq.Frame) -> int | None:
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _peer(fd: int) -> object:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays ZeroMQ's


def _shut_down(fd: int, peer: object) -> bool:
    """Shut down the TCP connection on ``fd`` if it still is the one to ``peer``."""
    if peer is None or _peer(fd) != peer:
        return False  # gone already, or the descriptor now belongs to another connection
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)  # ZeroMQ sees the peer leave and closes its side
        return True
    except OSError:
        return False
    finally:
        sock.detach()
