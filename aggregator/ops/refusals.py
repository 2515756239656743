"""Refused connections, logged once per peer and then at most once a minute.

A peer whose key is refused tends to retry every few seconds forever; its refusals must be
visible in the log without flooding it. :class:`RefusalLog` logs the first refusal of each peer
at once and then one line per ``every_s`` with how many were refused meanwhile (it remembers
at most ``max_peers`` peers, forgetting the least recent), and at most ``max_lines`` lines a
minute in all (an outsider with a fresh key per connection is a new peer every time).
:class:`QuietLog` is the same for any warning an agent's messages cause (malformed messages,
a full send queue).

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


class QuietLog:
    """Warnings keyed by who causes them, logged once per key and then at most once per
    ``every_s`` with how many were held back meanwhile (at most ``max_keys`` keys are
    remembered, the least recent forgotten), and at most ``max_lines`` lines per ``every_s`` in
    all: a flood from many keys (a fresh CURVE key per connection) or many messages from one
    agent costs a few lines a minute, not a line per message. What the budget held back is
    counted in the next line that is logged."""

    more = "more"
    """How a line names what its key's interval held back ("3 more since the last line")."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 60.0,
        max_keys: int = 4096,
        max_lines: int = 60,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, tuple[float, int]] = OrderedDict()  # last logged, since
        self._window = (float("-inf"), 0)  # start, lines logged in it
        self._held = 0  # held back by the budget

    def warn(
        self, key: str, msg: str, *args: object, now: float | None = None, exc_info: bool = False
    ) -> bool:
        """Count one ``msg % args`` of ``key``; log it if due (with the exception being
        handled, if ``exc_info``). True when a line was logged."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last, hidden = self._keys.pop(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._keys[key] = (last, hidden + 1)
                return False
            start, lines = self._window
            if now - start >= self.every_s:
                start, lines = now, 0
            if lines >= self.max_lines:
                self._window = (start, lines)
                # counted once, in the budget's count (not also in the key's)
                self._keys[key] = (last if last is not None else float("-inf"), hidden)
                self._held += 1
                self._trim()
                return False
            self._window = (start, lines + 1)
            self._keys[key] = (now, 0)
            self._trim()
            held, self._held = self._held, 0
        more = f" ({hidden} {self.more} since the last line)" if hidden else ""
        if held:
            more += f" ({held} other lines held back: more than {self.max_lines} a minute)"
        self.logger.warning(msg + "%s", *args, more, exc_info=exc_info)
        return True

    def _trim(self) -> None:
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)


class RefusalLog(QuietLog):
    more = "more refused"

    def __init__(self, every_s: float = 60.0, max_peers: int = 4096, max_lines: int = 30) -> None:
        super().__init__(log, every_s, max_peers, max_lines)

    def refused(self, peer: str, why: str, now: float | None = None) -> bool:
        """Count a refusal of ``peer``; log it if due. True when a line was logged."""
        return self.warn(peer, "refused %s: %s", peer, why, now=now)


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
