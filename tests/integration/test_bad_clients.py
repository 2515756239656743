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
from collections.abc import Callable, Iterator
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
        self,
        name: str,
        *,
        curve: bool = True,
        server_key: bytes | None = None,
        routing_id: str | None = None,
    ) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, (routing_id or name).encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 2000)  # a cut connection must not block the test
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


def refused_or_cut(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Whether a message is refused (IDENTITY_MISMATCH) or cannot even be delivered."""
    try:
        sock.send_multipart(frames)
    except zmq.Again:
        return True  # no connection left: the handshake with the old key is refused
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = receive(sock, 0.5)
        if isinstance(msg, ErrorReply):
            return msg.code == ErrorCode.IDENTITY_MISMATCH
        if msg is not None and not isinstance(msg, Heartbeat):
            return False
    return True  # nothing came back: the message never reached the engine


def test_revoked_key_is_cut_off_at_its_next_message(agg: Aggregator) -> None:
    sock = agg.client("revoked")
    sock.send_multipart(hello("revoked"))
    assert isinstance(receive(sock, 5.0), Welcome)
    (agg.allow / "revoked.key").unlink()
    registry = agg.service.engine.registry
    assert wait_until(lambda: not registry.agents["revoked"].live, 15.0)  # dropped unasked
    seen = registry.agents["revoked"].last_seen
    assert refused_or_cut(sock, [bytes(f) for f in encode(Heartbeat())])
    assert not registry.agents["revoked"].live and registry.agents["revoked"].last_seen == seen


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


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_new_key_is_admitted_with_no_other_traffic(agg: Aggregator) -> None:
    # issue 24 (6): the allow-list was re-read only when some other agent sent a message
    public, _ = zmq.auth.create_certificates(str(agg.keys), "newcomer")
    Path(public).rename(agg.allow / "newcomer.key")
    welcome = None
    deadline = time.monotonic() + 15
    while welcome is None and time.monotonic() < deadline:
        # a fresh connection per try, as the agent reconnects; nobody else says a word
        sock = agg.client("newcomer")
        try:
            sock.send_multipart(hello("newcomer"))  # refused at the handshake until reloaded
            welcome = receive(sock, 1.0)
        except zmq.Again:
            pass
        sock.close(linger=0)
        agg.sockets.remove(sock)
    assert isinstance(welcome, Welcome)


def test_a_rotated_key_loses_its_open_session(agg: Aggregator) -> None:
    # issue 24 (4): overwriting the allow file (the documented rotation) left the old key's
    # open connection working
    old = agg.client("revoked")
    old.send_multipart(hello("revoked"))
    assert isinstance(receive(old, 5.0), Welcome)
    rotated = agg.keys / "rotated"
    rotated.mkdir()
    new_public, _ = zmq.auth.create_certificates(str(rotated), "revoked")
    Path(new_public).replace(agg.allow / "revoked.key")
    registry = agg.service.engine.registry
    assert wait_until(lambda: not registry.agents["revoked"].live, 15.0)  # dropped unasked
    seen = registry.agents["revoked"].last_seen
    assert refused_or_cut(old, [bytes(f) for f in encode(Heartbeat())])
    assert not registry.agents["revoked"].live and registry.agents["revoked"].last_seen == seen
    old.close(linger=0)
    new = agg.ctx.socket(zmq.DEALER)  # the agent restarted with its new key: welcome
    new.setsockopt(zmq.ROUTING_ID, b"revoked")
    new.setsockopt(zmq.LINGER, 0)
    new.setsockopt(zmq.SNDTIMEO, 2000)
    public, secret = zmq.auth.load_certificate(rotated / "revoked.key_secret")
    new.curve_publickey, new.curve_secretkey = public, secret  # type: ignore[assignment]
    new.curve_serverkey = zmq.auth.load_certificate(agg.server_public)[0]
    new.connect(agg.endpoint)
    agg.sockets.append(new)
    welcome = None
    deadline = time.monotonic() + 15
    while welcome is None and time.monotonic() < deadline:
        try:
            new.send_multipart(hello("revoked"))
        except zmq.Again:
            continue
        welcome = receive(new, 1.0)
    assert isinstance(welcome, Welcome)


def test_an_allowed_key_cannot_take_over_a_connected_agents_routing_id(agg: Aggregator) -> None:
    # issue 24 (5): with ROUTER_HANDOVER, "revoked" connecting under the routing id "good" took
    # the victim's connection: the victim's heartbeats went nowhere and the attacker got its mail
    victim = agg.client("good")
    victim.send_multipart(hello("good"))
    assert isinstance(receive(victim, 5.0), Welcome)
    attacker = agg.client("revoked", routing_id="good")
    attacker.send_multipart(hello("good"))
    time.sleep(0.5)
    for _ in range(3):  # the victim still gets through, and its answers come to it
        probe = Heartbeat(probe=True)
        victim.send_multipart([bytes(f) for f in encode(probe)])
        deadline = time.monotonic() + 5
        echo = None
        while echo is None and time.monotonic() < deadline:
            msg = receive(victim, 0.5)  # the aggregator's own heartbeats come too
            echo = msg if isinstance(msg, Heartbeat) and msg.echo == probe.msg_id else None
        assert echo is not None
    assert receive(attacker, 1.0) is None
    assert agg.service.engine.registry.agents["good"].live
