"""CURVE authentication for the aggregator's ROUTER: a ZAP authenticator over an allow-list.

The allow-list is a directory of agents' public key files (``<agent id>.key``, as written by
``edgefed-agent keygen``). The authenticator maps an authenticated key to the agent id of its
file, and ZeroMQ hands that id to the service as each message's ``User-Id``; the service checks
it against the id the agent claims. Removing a file revokes the key: the list is re-read every
few seconds and a connection whose key is no longer listed is refused at its next message.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq
from zmq.auth import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from aggregator.errors import ConfigError

log = logging.getLogger(__name__)


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


class AllowListAuthenticator(ThreadAuthenticator):
    """ZAP handler: CURVE clients whose key is in the allow-list; User-Id = agent id."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], allow_dir: Path, refresh_s: float = 2.0
    ) -> None:
        super().__init__(context)
        self.allow_dir = allow_dir
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._names: dict[bytes, str] = {}
        self._loaded = 0.0

    def reload(self) -> dict[bytes, str]:
        names = read_allow_list(self.allow_dir)
        with self._lock:
            self._names = names
            self._loaded = time.monotonic()
        self.configure_curve(domain="*", location=str(self.allow_dir))
        return names

    def maybe_reload(self) -> None:
        if time.monotonic() - self._loaded >= self.refresh_s:
            try:
                self.reload()
            except ConfigError as exc:
                log.error("allow-list reload failed, keeping the previous one: %s", exc)

    def allowed_ids(self) -> set[str]:
        with self._lock:
            return set(self._names.values())

    def curve_user_id(self, client_public_key: bytes) -> str:
        with self._lock:
            return self._names.get(z85.encode(client_public_key), "")


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
