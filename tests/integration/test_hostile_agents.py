"""An allowed but malicious agent against a real ``serve`` process (issue 24).

Each test is a finding of the attack report: it sends what the attacker sent and checks what the
attacker now gets, and that the service, and the honest agents, carry on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import Served, hello_frames, receive_type

from protocol.frames import SIGNATURE
from protocol.messages import MAX_REASON, ErrorReply, Welcome

# headers whose validation error quoted ~3 KB of the sender's input: each one killed `serve`
CRASHERS = [
    {"type": "x" * 3000},
    {"type": "heartbeat", "y" * 3000: 1},
    {"type": "bye", "reason": "z" * 3000},
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, ["edge-1", "edge-2"])
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_a_header_whose_error_quotes_kilobytes_is_answered_and_serve_runs_on(
    served: Served,
) -> None:
    sock = served.client("edge-1")
    for header in CRASHERS:
        sock.send_multipart([SIGNATURE, json.dumps(header).encode()])
        reply = receive_type(sock, ErrorReply, 20.0)
        assert reply is not None, served.logs()
        assert len(reply.reason) <= MAX_REASON
        assert served.alive(), served.logs()
    sock.send_multipart(hello_frames("edge-1"))  # and the service still admits agents
    assert isinstance(receive_type(sock, Welcome, 20.0), Welcome), served.logs()
    assert served.alive()
