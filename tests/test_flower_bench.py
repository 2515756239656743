"""The counting proxy behind the Flower comparison: exact byte counts, both ways, many at once.

Plain sockets on loopback only; no Flower, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks._tcp_count import CountingProxy, ProxyError

MB = 1024 * 1024


def _payload(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


class _HashServer:
    """For each connection: read to EOF, reply ``reply_size`` bytes derived from what it read."""

    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = _recv_all(conn)
            with self._lock:
                self.received.append(data)
            seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
            # the peer may be gone (the proxy was closed under it)
            with contextlib.suppress(OSError):
                conn.sendall(_payload(self.reply_size, seed))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.sock.close()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def server() -> Iterator[_HashServer]:
    srv = _HashServer(reply_size=3 * MB + 17)
    yield srv
    srv.close()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the half-close must reach the server through the proxy
        return _recv_all(sock)


def test_counts_one_connection_exactly_both_ways(server: _HashServer) -> None:
    data = _payload(2 * MB + 5, seed=1)
    with CountingProxy(target=("127.0.0.1", server.port), timeline=True) as proxy:
        assert proxy.port != server.port
        reply = _exchange(proxy.port, data)
        assert proxy.bytes_up == 2 * MB + 5
        assert proxy.bytes_down == 3 * MB + 17
        assert proxy.connections == 1
        assert proxy.failed == 0
        # the timeline gives the same totals for a window that covers everything, none before
        assert proxy.bytes_between(0.0, time.time() + 1) == (2 * MB + 5, 3 * MB + 17)
        assert proxy.counts_at(0.0) == (0, 0)
    assert server.received == [data]
    seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
    assert reply == _payload(3 * MB + 17, seed)


def test_counts_several_concurrent_connections(server: _HashServer) -> None:
    sizes = [MB, 2 * MB + 1, 3 * MB + 2, 1, 0, 512 * 1024]
    datas = [_payload(n, seed=10 + i) for i, n in enumerate(sizes)]
    replies: dict[int, bytes] = {}
    start = threading.Barrier(len(datas))

    def client(i: int) -> None:
        start.wait()
        replies[i] = _exchange(proxy.port, datas[i])

    with CountingProxy(target=("127.0.0.1", server.port)) as proxy:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(datas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert proxy.bytes_up == sum(sizes)
        assert proxy.bytes_down == len(sizes) * (3 * MB + 17)
        assert proxy.connections == len(sizes)
    assert sorted(server.received) == sorted(datas)
    assert all(len(replies[i]) == 3 * MB + 17 for i in range(len(datas)))


def test_window_counts_split_two_exchanges(server: _HashServer) -> None:
    with CountingProxy(target=("127.0.0.1", server.port), timeline=True) as proxy:
        _exchange(proxy.port, _payload(MB, seed=2))
        between = time.time()
        time.sleep(0.01)
        _exchange(proxy.port, _payload(100, seed=3))
        assert proxy.bytes_between(0.0, between) == (MB, 3 * MB + 17)
        assert proxy.bytes_between(between, time.time() + 1) == (100, 3 * MB + 17)


def test_close_cuts_idle_connections_and_is_idempotent(server: _HashServer) -> None:
    proxy = CountingProxy(target=("127.0.0.1", server.port)).start()
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    idle.sendall(b"hello")
    deadline = time.time() + 5
    while proxy.bytes_up < 5 and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    proxy.close()
    proxy.close()
    assert time.monotonic() - t0 < 3
    assert idle.recv(10) == b""  # the proxy hung up on the client
    idle.close()
    assert proxy.bytes_up == 5
    with pytest.raises(ProxyError):
        proxy.counts_at(0.0)  # no timeline asked for


def test_unreachable_target_is_counted_as_failed() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    dead_port = spare.getsockname()[1]
    spare.close()
    with CountingProxy(target=("127.0.0.1", dead_port)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            assert _recv_all(sock) == b""
        deadline = time.time() + 5
        while proxy.failed < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert (proxy.connections, proxy.failed, proxy.bytes_up) == (1, 1, 0)


def test_lora_shapes_match_smollm2_peft_state_dict() -> None:
    from benchmarks.flower_side import lora_shapes

    def smollm2(targets: list[str]) -> list[tuple[str, tuple[int, ...]]]:
        return lora_shapes(576, 1536, 30, 9, 3, 8, targets)

    every = smollm2(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    qkvo = smollm2(["v_proj", "q_proj", "o_proj", "k_proj"])  # order given does not matter
    qv = smollm2(["q_proj", "v_proj"])

    def nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
        return sum(4 * a * b for _, (a, b) in shapes)

    assert (len(every), nbytes(every)) == (420, 9_768_960)
    assert (len(qkvo), nbytes(qkvo)) == (240, 3_686_400)  # edgefed's fedit default
    assert (len(qv), nbytes(qv)) == (120, 1_843_200)
    assert qkvo[:4] == [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (8, 576)),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", (576, 8)),
        ("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", (8, 576)),
        ("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", (192, 8)),
    ]
    assert every[-1] == ("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight", (576, 8))
