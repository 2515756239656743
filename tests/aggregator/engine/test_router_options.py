"""The service ROUTER survives a peer that fills its receive queue and hangs up.

With ZMTP heartbeats on, libzmq 4.3.5 aborts the process at the next ping in that state
(``Assertion failed: !_io_error``), so the scenario runs in a child process and the test checks
that it exits cleanly having received every queued message.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import zmq

from aggregator.engine.service import configure_router
from aggregator.ops.config import ServerSection

SCENARIO = textwrap.dedent(
    """
    import time, zmq
    from aggregator.engine.service import configure_router
    from aggregator.ops.config import ServerSection

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    configure_router(router, ServerSection(hwm=2, heartbeat_interval=0.1, liveness=3))
    port = router.bind_to_random_port("tcp://127.0.0.1")
    for i in range(3):  # the service is busy: it reads nothing while each peer floods and leaves
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.IDENTITY, b"agent-%d" % i)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(50):
            peer.send(b"x" * 100_000)
        time.sleep(0.5)
        peer.close(0)
        time.sleep(1.0)  # ten heartbeat intervals with a full queue and a dead peer
    got = 0
    while router.poll(500):
        router.recv_multipart()
        got += 1
    print("received", got)
    """
)


def test_a_peer_that_fills_its_queue_and_hangs_up_does_not_abort_the_service() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCENARIO], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    received = int(proc.stdout.split()[-1])
    assert received >= 3 * 2  # at least each peer's queued messages were delivered


def test_dead_peers_are_dropped_by_tcp_keepalive_not_zmtp_heartbeats() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    try:
        configure_router(sock, ServerSection(heartbeat_interval=2.0, liveness=3))
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) == 6
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_INTVL) == 2
        assert sock.getsockopt(zmq.RCVHWM) == 8
    finally:
        sock.close(0)
