"""CURVE authentication for the aggregator's ROUTER: a ZAP authenticator over an allow-list.

The allow-list is a directory of agents' public key files (``<agent id>.key``, as written by
``edgefed-agent keygen``). The authenticator maps an authenticated key to the agent id of its
file plus the key's fingerprint (``<agent id>#<fingerprint>``), and ZeroMQ hands that to the
service as each message's ``User-Id``; :mod:`aggregator.ops.sessions` checks it against the id the
agent claims *and* against the key now listed for that id. The service re-reads the list every
:data:`REFRESH_S` seconds on its own clock (not only when a message arrives): a new file admits
its key at once, and removing or overwriting a file (key rotation) revokes the old key, whose
session is dropped at the reload and whose every later message is refused.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import zmq
from zmq.auth import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from aggregator.errors import ConfigError
from aggregator.ops.refusals import RefusalLog, RefusalLogging

log = logging.getLogger(__name__)

REFRESH_S = 2.0
"""How often the service re-reads the allow-list directory."""


def fingerprint(z85_public: bytes) -> str:
    """A short, stable name of a public key (the first 16 hex digits of its sha256)."""
    return hashlib.sha256(z85_public).hexdigest()[:16]


def read_allow_list(allow_dir: Path) -> dict[bytes, str]:
    """z85 public key → agent id, for every ``*.key`` file in ``allow_dir``."""
    if not allow_dir.is_dir():
        raise ConfigError(f"allow-list directory {allow_dir} does not exist")
    keys: dict[bytes, str] = {}
    for path in sorted(allow_dir.glob("*.key")):
        try:
            public, _ = load_certificate(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a CURVE public key file: {exc}") from None
        keys[public] = path.stem
    return keys


class AllowListAuthenticator(RefusalLogging, ThreadAuthenticator):
    """ZAP handler: CURVE clients whose key is in the allow-list; User-Id = agent id. Refused
    handshakes are logged (once per peer, then once a minute; :mod:`aggregator.ops.refusals`)."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], allow_dir: Path, refresh_s: float = REFRESH_S
    ) -> None:
        super().__init__(context)
        self.allow_dir = allow_dir
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._names: dict[bytes, str] = {}
        self._prints: dict[str, str] = {}  # agent id -> fingerprint of its listed key
        self._loaded = 0.0
        self.refusals = RefusalLog()

    def reload(self) -> dict[bytes, str]:
        names = read_allow_list(self.allow_dir)
        prints = {name: fingerprint(key) for key, name in names.items()}
        with self._lock:
            self._names, self._prints = names, prints
            self._loaded = time.monotonic()
        self.configure_curve(domain="*", location=str(self.allow_dir))
        return names

    def maybe_reload(self) -> bool:
        """Re-read the list if :attr:`refresh_s` has passed; True when it was re-read."""
        if time.monotonic() - self._loaded < self.refresh_s:
            return False
        try:
            self.reload()
        except ConfigError as exc:
            self._loaded = time.monotonic()  # try again at the next refresh, not at once
            log.error("allow-list reload failed, keeping the previous one: %s", exc)
            return False
        return True

    def allowed_ids(self) -> set[str]:
        with self._lock:
            return set(self._names.values())

    def listed(self, agent_id: str, key_fingerprint: str) -> bool:
        """Whether ``agent_id``'s file holds the key with ``key_fingerprint`` now."""
        with self._lock:
            return self._prints.get(agent_id) == key_fingerprint

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85_key = z85.encode(client_public_key)
        with self._lock:
            name = self._names.get(z85_key, "")
        return f"{name}#{fingerprint(z85_key)}" if name else ""


def start_curve_server(
    context: zmq.Context[zmq.Socket[bytes]],
    socket: zmq.Socket[bytes],
    secret_key: Path,
    allow_dir: Path,
) -> AllowListAuthenticator:
    """Start the authenticator and make ``socket`` a CURVE server; refuse an empty allow-list."""
    try:
        public, secret = load_certificate(secret_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{secret_key}: cannot read the aggregator's secret key: {exc}") from None
    if secret is None:
        raise ConfigError(f"{secret_key} holds no secret key (use the .key_secret file)")
    auth = AllowListAuthenticator(context, allow_dir)
    names = auth.reload()
    if not names:
        raise ConfigError(
            f"allow-list {allow_dir} is empty: no agent could connect; add agents' .key files"
        )
    auth.start()
    if not auth.is_alive():
        raise ConfigError("the ZAP authenticator did not start; refusing to serve without it")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    log.info("CURVE on: %d agents allowed from %s", len(names), allow_dir)
    return auth
