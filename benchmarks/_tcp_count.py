"""A loopback TCP forwarding proxy that counts the bytes in each direction.

Both sides of the Flower comparison measure their wire bytes with it: every client connects to
the proxy instead of the server, and the proxy forwards each connection to ``target``::

    with CountingProxy(target=("127.0.0.1", server_port), timeline=True) as proxy:
        ...  # point the clients at ("127.0.0.1", proxy.port)
        up, down = proxy.bytes_up, proxy.bytes_down
        round_up, round_down = proxy.bytes_between(t0, t1)

``bytes_up`` counts client -> server, ``bytes_down`` server -> client: the TCP payload, i.e.
what the applications wrote (no TCP/IP headers). One thread accepts; each connection gets two
pump threads, one per direction. An end-of-stream from one side is passed on as a half-close
(``shutdown(SHUT_WR)``) so request/response protocols that close one way keep working. With
``timeline=True`` the proxy keeps ``(time.time(), up, down)`` after every forwarded chunk, so
the bytes of a window given in wall-clock time (say, one round logged by another process on
the same host) can be read back exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


class ProxyError(Exception):
    """The proxy could not start or was used in a wrong state."""


@dataclass(frozen=True)
class Counts:
    """Totals at one moment: bytes each way and connections accepted so far."""

    at: float
    bytes_up: int
    bytes_down: int
    connections: int


class CountingProxy:
    """Forward every TCP connection on ``listen_host:listen_port`` to ``target``, counting bytes.

    ``listen_port=0`` picks a free port (read it from ``port`` after ``start()``). Many
    connections may be open at once. ``close()`` stops accepting, cuts the open connections and
    joins every thread; it is idempotent and runs on leaving a ``with`` block.
    """

    def __init__(
        self,
        target: tuple[str, int],
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        timeline: bool = False,
    ) -> None:
        self.target = target
        self._listen = (listen_host, listen_port)
        self._timeline_on = timeline
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._connections = 0
        self._failed = 0
        self._times: list[float] = []
        self._ups: list[int] = []
        self._downs: list[int] = []
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._server: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closing = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CountingProxy:
        """Bind, listen and start accepting; returns ``self``."""
        if self._server is not None:
            raise ProxyError("proxy already started")
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(self._listen)
        except OSError as exc:
            server.close()
            raise ProxyError(f"cannot listen on {self._listen}: {exc}") from exc
        server.listen(128)
        server.settimeout(0.2)
        self._server = server
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="proxy-accept", daemon=True
        )
        self._acceptor.start()
        log.debug("proxy %s -> %s", self.address, self.target)
        return self

    def close(self) -> None:
        """Stop accepting, cut open connections, join all threads."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._acceptor is not None:
            self._acceptor.join()
        if self._server is not None:
            self._server.close()
        with self._lock:
            open_socks = list(self._open)
            threads = list(self._threads)
        for sock in open_socks:
            _quiet_shutdown(sock, socket.SHUT_RDWR)
        for thread in threads:
            thread.join()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- readings --------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: (host, port)."""
        if self._server is None:
            raise ProxyError("proxy not started")
        host, port = self._server.getsockname()[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The listening port (useful with ``listen_port=0``)."""
        return self.address[1]

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client -> target so far."""
        with self._lock:
            return self._up

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded target -> client so far."""
        with self._lock:
            return self._down

    @property
    def connections(self) -> int:
        """Connections accepted so far (including any whose target refused them)."""
        with self._lock:
            return self._connections

    @property
    def failed(self) -> int:
        """Accepted connections that could not reach the target."""
        with self._lock:
            return self._failed

    def snapshot(self) -> Counts:
        """All counters at once, consistently."""
        with self._lock:
            return Counts(time.time(), self._up, self._down, self._connections)

    def counts_at(self, at: float) -> tuple[int, int]:
        """(up, down) totals as they stood at wall-clock time ``at`` (needs ``timeline=True``)."""
        if not self._timeline_on:
            raise ProxyError("counts_at needs CountingProxy(..., timeline=True)")
        with self._lock:
            i = bisect.bisect_right(self._times, at)
            if i == 0:
                return 0, 0
            return self._ups[i - 1], self._downs[i - 1]

    def bytes_between(self, start: float, end: float) -> tuple[int, int]:
        """(up, down) bytes forwarded in the wall-clock window ``(start, end]``."""
        up0, down0 = self.counts_at(start)
        up1, down1 = self.counts_at(end)
        return up1 - up0, down1 - down0

    # -- internals -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                raise
            client.settimeout(None)
            with self._lock:
                self._connections += 1
            thread = threading.Thread(target=self._connect, args=(client,), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError as exc:
            log.warning("proxy: cannot reach %s: %s", self.target, exc)
            with self._lock:
                self._failed += 1
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._closing.is_set():
                client.close()
                upstream.close()
                return
            self._open.update((client, upstream))
        down = threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True)
        with self._lock:
            self._threads.append(down)
        down.start()
        self._pump(client, upstream, True)
        down.join()
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)
        client.close()
        upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, is_up: bool) -> None:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            try:
                n = src.recv_into(buf)
            except OSError:
                n = 0
            if n == 0:
                break
            try:
                dst.sendall(view[:n])
            except OSError:
                _quiet_shutdown(src, socket.SHUT_RD)
                break
            self._count(n, is_up)
        _quiet_shutdown(dst, socket.SHUT_WR)

    def _count(self, n: int, is_up: bool) -> None:
        with self._lock:
            if is_up:
                self._up += n
            else:
                self._down += n
            if self._timeline_on:
                self._times.append(time.time())
                self._ups.append(self._up)
                self._downs.append(self._down)


def _quiet_shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)
