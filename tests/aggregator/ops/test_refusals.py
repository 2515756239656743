"""Refused handshakes: logged once per peer (then once a minute), and the agent learns why."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from aggregator.ops.refusals import RefusalLog
from aggregator.ops.security import start_curve_server
from edge_agent.daemon.link import CurveKeys, Link, LinkSettings
from protocol.frames import encode
from protocol.messages import Bye


def test_a_peer_is_logged_once_then_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = RefusalLog(every_s=60.0, max_peers=2)
    caplog.set_level(logging.WARNING)
    logged = [refusals.refused("p1", "unknown key", now=t) for t in (0.0, 1.0, 30.0, 61.0)]
    assert logged == [True, False, False, True]
    assert "refused p1: unknown key (2 more refused since the last line)" in caplog.text
    assert refusals.refused("p2", "unknown key", now=62.0)
    assert refusals.refused("p3", "unknown key", now=62.0)  # p1 is forgotten (max_peers 2)
    assert refusals.refused("p1", "unknown key", now=63.0)


def wait_for_problem(link: Link) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        problem = link.handshake_problem()
        if problem is not None:
            return problem
        time.sleep(0.05)
    raise AssertionError("no handshake failure reported")


def test_an_unknown_key_is_refused_logged_once_and_the_agent_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(allow, "edge-1")  # the allowed agent, not us
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    caplog.set_level(logging.WARNING, logger="aggregator.ops.security")
    auth = start_curve_server(ctx, router, Path(server_secret), allow)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    curve = CurveKeys.load(Path(stranger_secret), Path(server_public))
    link = Link(LinkSettings("edge-9", f"tcp://127.0.0.1:{port}", curve, 0.05, 0.2), ctx)
    try:
        for _ in range(3):  # three connections, each refused
            link.open()
            link.send(encode(Bye(reason="hello?")))
            problem = wait_for_problem(link)
            link.close()
        assert "refused this agent's CURVE key" in problem
        assert "allow-list" in problem
        assert router.poll(200) == 0  # nothing of the stranger's got through
    finally:
        link.close()
        auth.stop()
        router.close(0)
        ctx.term()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(lines) == 1, lines
    stranger_key = zmq.auth.load_certificate(stranger_secret)[0].decode()
    assert lines[0] == (
        f"refused 127.0.0.1 with CURVE key {stranger_key}: the key is not in the allow-list "
        "(unknown, or revoked)"
    )


def test_a_fresh_key_per_connection_costs_a_few_lines_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outsider with a new CURVE key for every connection is a new peer every time: the
    log takes at most max_lines of them a minute, then says how many it held back."""
    refusals = RefusalLog(every_s=60.0, max_lines=30)
    caplog.set_level(logging.WARNING)
    logged = [refusals.refused(f"10.0.0.1 with CURVE key k{i}", "unknown", now=i / 100)
              for i in range(3000)]  # fmt: skip
    assert sum(logged) == 30 and len(caplog.records) == 30
    assert refusals.refused("10.0.0.1 with CURVE key late", "unknown", now=61.0)
    assert "(2970 other lines held back: more than 30 a minute)" in caplog.records[-1].getMessage()


def test_an_agents_flood_of_bad_messages_is_a_line_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """98,000 malformed messages from one allowed agent once wrote 98,000 warnings (2.8 MB/s)."""
    from engine_harness import Harness

    from aggregator.engine.boundary import MessageBoundary

    h = Harness(tmp_path)
    boundary = MessageBoundary(h.engine)
    caplog.set_level(logging.WARNING)
    for i in range(2000):
        out = boundary.handle("noisy", [b"not a header"], now=float(i) / 1000)
        assert out and out[0].header.type == "error"
    noisy = [r for r in caplog.records if "noisy" in r.getMessage()]
    assert len(noisy) == 1 and "malformed message" in noisy[0].getMessage()
    boundary.handle("noisy", [b"not a header"], now=100.0)  # a minute on: one line, counted
    assert "(1999 more since the last line)" in caplog.records[-1].getMessage()
    h.close()
