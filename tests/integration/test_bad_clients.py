"""Bad clients against a CURVE aggregator on loopback: none of their messages reaches the engine.

No key, an unknown key, a wrong server key and raw TCP garbage never get a message through; a
revoked key is cut off at its next message; an allowed key works (the control that shows the
test can tell the difference).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from aggregator.engine.service import AggregatorService
from aggregator.ops.config import build_config
from protocol.errors import ErrorCode
from protocol.frames import decode, encode
from protocol.messages import BaseModelRef, ErrorReply, Heartbeat, Hello, Profile, Welcome

SHA = "ab" * 32
PROFILE = Profile(hostname="h", os="Linux", python="3.11", torch="2.13", cpus=2,
                  ram_total=1 << 30, ram_available=1 << 30, disk_free=1 << 30)  # fmt: skip


class Aggregator:
    def __init__(self, tmp: Path) -> None:
        self.keys = tmp / "keys"
        self.allow = tmp / "allow"
        self.allow.mkdir(parents=True)
        self.keys.mkdir()
        self.server_public, self.server_secret = zmq.auth.create_certificates(
            str(self.keys), "server"
        )
        for agent in ("good", "revoked"):
            public, _ = zmq.auth.create_certificates(str(self.keys), agent)
            Path(public).rename(self.allow / f"{agent}.key")
        zmq.auth.create_certificates(str(self.keys), "stranger")
        raw = {
            "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(tmp / "state")},
            "security": {"secret_key": self.server_secret, "allow_dir": str(self.allow)},
            "run": {"model_sha256": SHA, "min_agents": 5},
        }
        self.service = AggregatorService(build_config(raw), BaseModelRef(name="m", sha256=SHA))
        assert self.service.auth is None
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        assert self.service.bound.wait(10)
        self.endpoint = self.service.endpoint
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def client(
        self, name: str, *, curve: bool = True, server_key: bytes | None = None
    ) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        if curve:
            secret_file = self.keys / f"{name}.key_secret"
            public, secret = zmq.auth.load_certificate(secret_file)
            sock.curve_publickey = public
            sock.curve_secretkey = secret  # type: ignore[assignment]
            sock.curve_serverkey = server_key or zmq.auth.load_certificate(self.server_public)[0]
        sock.connect(self.endpoint)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        self.service.should_exit.set()
        self.thread.join(10)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def agg(tmp_path: Path) -> Iterator[Aggregator]:
    a = Aggregator(tmp_path)
    yield a
    a.close()


def hello(name: str) -> list[bytes]:
    return [
        bytes(f) for f in encode(Hello(agent_id=name, versions=[1], profile=PROFILE, models=[SHA]))
    ]


def receive(sock: zmq.Socket[bytes], timeout_s: float) -> object | None:
    if sock.poll(int(timeout_s * 1000)):
        return decode(sock.recv_multipart()).header
    return None


def test_only_allowed_keys_get_through(agg: Aggregator) -> None:
    plain = agg.client("good", curve=False)  # the right name, no CURVE at all
    plain.send_multipart(hello("good"))
    stranger = agg.client("stranger")  # a valid key pair that is not on the allow-list
    stranger.send_multipart(hello("stranger"))
    impostor = agg.client(
        "good", server_key=zmq.auth.load_certificate(agg.keys / "stranger.key")[0]
    )
    impostor.send_multipart(hello("good"))  # right client key, wrong server key
    with socket.create_connection(("127.0.0.1", int(agg.endpoint.rsplit(":", 1)[1]))) as raw:
        raw.sendall(b"\x00\xff" * 5000 + b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.5)
    for sock in (plain, stranger, impostor):
        assert receive(sock, 1.0) is None
    assert agg.service.engine.registry.agents == {}  # nothing reached the engine

    good = agg.client("good")  # the control: an allowed key is welcomed
    good.send_multipart(hello("good"))
    reply = receive(good, 5.0)
    assert isinstance(reply, Welcome)
    assert set(agg.service.engine.registry.agents) == {"good"}


def test_claiming_another_agents_id_is_refused(agg: Aggregator) -> None:
    # authenticated as "revoked" but connecting under the routing id "good"
    sock = agg.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"good")
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.auth.load_certificate(agg.keys / "revoked.key_secret")
    sock.curve_publickey = public
    sock.curve_secretkey = secret  # type: ignore[assignment]
    sock.curve_serverkey = zmq.auth.load_certificate(agg.server_public)[0]
    sock.connect(agg.endpoint)
    agg.sockets.append(sock)
    sock.send_multipart(hello("good"))
    reply = receive(sock, 5.0)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.IDENTITY_MISMATCH
    assert agg.service.engine.registry.agents == {}


def test_revoked_key_is_cut_off_at_its_next_message(agg: Aggregator) -> None:
    sock = agg.client("revoked")
    sock.send_multipart(hello("revoked"))
    assert isinstance(receive(sock, 5.0), Welcome)
    (agg.allow / "revoked.key").unlink()
    time.sleep(2.5)  # the allow-list is re-read every 2 s
    agg.service.engine.registry.agents.clear()
    sock.send_multipart([bytes(f) for f in encode(Heartbeat())])
    deadline = time.monotonic() + 5
    refused = None
    while time.monotonic() < deadline and refused is None:
        msg = receive(sock, 0.5)
        if isinstance(msg, ErrorReply):
            refused = msg
    assert refused is not None and refused.code == ErrorCode.IDENTITY_MISMATCH
    assert agg.service.engine.registry.agents == {}


def test_oversized_message_is_dropped_at_the_socket(tmp_path: Path) -> None:
    raw = {
        "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(tmp_path / "state"),
                   "max_message_bytes": 1 << 20},
        "security": {"insecure": True},
        "run": {"model_sha256": SHA, "min_agents": 5},
    }  # fmt: skip
    service = AggregatorService(build_config(raw), BaseModelRef(name="m", sha256=SHA))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert service.bound.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"big")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.endpoint)
    try:
        sock.send_multipart(hello("big"))
        assert isinstance(receive(sock, 5.0), Welcome)
        seen_before = service.engine.registry.agents["big"].last_seen
        probe = encode(Heartbeat(probe=True), {"probe": b"\0" * (8 << 20)})  # 8 MiB > 1 MiB cap
        sock.send_multipart(probe, copy=False)
        time.sleep(1.0)
        # ZeroMQ dropped the connection before the message existed for the service
        assert service.engine.registry.agents["big"].last_seen == seen_before
        assert service.dropped == 0  # nothing malformed ever reached the decoder
    finally:
        service.should_exit.set()
        thread.join(10)
        sock.close(linger=0)
        ctx.term()


def test_start_up_self_test_refuses_an_authenticator_that_lets_anyone_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from zmq.auth.base import Authenticator

    from aggregator.errors import ConfigError
    from aggregator.ops.security import AllowListAuthenticator

    caplog.set_level(logging.INFO, logger="aggregator.engine.service")
    agg = Aggregator(tmp_path / "ok")  # a correct authenticator passes the self-test
    agg.close()
    assert "self-test passed: an unknown CURVE key was refused" in caplog.text

    def allow_any(self: Authenticator, domain: str = "*", location: object = ".") -> None:
        Authenticator.configure_curve(self, domain, zmq.auth.CURVE_ALLOW_ANY)

    monkeypatch.setattr(AllowListAuthenticator, "configure_curve", allow_any)
    keys = tmp_path / "bad"
    (keys / "allow").mkdir(parents=True)
    pub, secret = zmq.auth.create_certificates(str(keys), "server")
    agent_pub, _ = zmq.auth.create_certificates(str(keys), "edge")
    Path(agent_pub).rename(keys / "allow" / "edge.key")
    raw = {
        "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(keys / "state")},
        "security": {"secret_key": secret, "allow_dir": str(keys / "allow")},
        "run": {"model_sha256": SHA},
    }
    service = AggregatorService(build_config(raw), BaseModelRef(name="m", sha256=SHA))
    with pytest.raises(ConfigError, match="self-test failed"):
        service.run()
