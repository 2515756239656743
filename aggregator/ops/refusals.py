"""Refused connections, logged once per peer and then at most once a minute.

A peer whose key is refused tends to retry every few seconds forever; its refusals must be
visible in the log without flooding it. :class:`RefusalLog` logs the first refusal of each peer
at once and then one line per ``every_s`` with how many were refused meanwhile (it remembers
at most ``max_peers`` peers, forgetting the least recent).

:class:`RefusalLogging` is mixed into the ZAP authenticator
(:class:`aggregator.ops.security.AllowListAuthenticator`): a CURVE handshake refused because its key
is on no allow-list (unknown, or revoked since) is logged with the peer's address and key (a
peer is one address with one key). A message whose User-Id does not match the agent it claims
(or whose key was revoked since it connected) is logged by the service through the same
:class:`RefusalLog`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from zmq.utils import z85

log = logging.getLogger("aggregator.ops.security")


class RefusalLog:
    def __init__(self, every_s: float = 60.0, max_peers: int = 4096) -> None:
        self.every_s = every_s
        self.max_peers = max_peers
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()  # last logged, since

    def refused(self, peer: str, why: str, now: float | None = None) -> bool:
        """Count a refusal of ``peer``; log it if due. True when a line was logged."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last, hidden = self._peers.pop(peer, (None, 0))
            if last is not None and now - last < self.every_s:
                self._peers[peer] = (last, hidden + 1)
                return False
            self._peers[peer] = (now, 0)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        more = f" ({hidden} more refused since the last line)" if hidden else ""
        log.warning("refused %s: %s%s", peer, why, more)
        return True


class RefusalLogging:
    """ZAP authenticator mixin: logs refused CURVE handshakes through a :class:`RefusalLog`."""

    refusals: RefusalLog
    _zap_peer = ""
    expected_refusals: frozenset[bytes] = frozenset()
    """Raw public keys whose refusal is expected and not logged (the start-up self-test's)."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:  # version, request id, domain, address, identity, mechanism...
            self._zap_peer = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)  # type: ignore[misc]

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed: bool
        reason: bytes
        allowed, reason = await super()._authenticate_curve(domain, client_key)  # type: ignore[misc]
        if not allowed and client_key not in self.expected_refusals:
            key = z85.encode(client_key).decode()
            self.refusals.refused(
                f"{self._zap_peer or 'a peer'} with CURVE key {key}",
                "the key is not in the allow-list (unknown, or revoked)",
            )
        return allowed, reason
