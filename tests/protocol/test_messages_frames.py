"""Messages and frames: round trips and every kind of tampering, each with its own error."""

import hashlib
import json
from pathlib import Path

import pytest

from protocol import PROTOCOL_VERSIONS
from protocol.errors import (
    BadHeader,
    BadSignature,
    BlobHashMismatch,
    BlobLengthMismatch,
    ErrorCode,
    FrameCountMismatch,
    HeaderTooLarge,
    VersionMismatch,
)
from protocol.frames import MAX_HEADER, SIGNATURE, decode, encode, load_message, save_message
from protocol.messages import (
    Ack,
    BaseModelRef,
    Bye,
    ErrorReply,
    Heartbeat,
    Hello,
    Profile,
    TaskAssign,
    TaskResult,
    Welcome,
    dump_header,
    negotiate,
    parse_header,
)

PROFILE = Profile(
    hostname="edge-1",
    os="Linux",
    python="3.11.7",
    torch="2.13.0",
    cpus=2,
    ram_total=24 << 30,
    ram_available=20 << 30,
    disk_free=50 << 30,
    matmul_gflops_fp32=40.5,
)
SHA = "ab" * 32

ALL = [
    Hello(agent_id="edge-1", versions=[1], profile=PROFILE, methods=["fedit"], models=[SHA]),
    Welcome(agent_id="edge-1", version=1, heartbeat_interval=1.0, liveness=3),
    Heartbeat(run_id="run-1", round=2, state="busy", task_id="t1", progress=0.5),
    TaskAssign(
        run_id="run-1",
        round=3,
        task_id="t-3-edge-1",
        method="fedit",
        model=BaseModelRef(name="smollm2-135m", sha256=SHA),
        params={"lr": 1e-4, "steps": 4, "target_modules": ["q_proj", "v_proj"]},
    ),
    TaskResult(
        run_id="run-1",
        round=3,
        task_id="t-3-edge-1",
        agent_id="edge-1",
        method="fedit",
        num_examples=64,
        metrics={"train_loss": 1.25},
    ),
    Ack(run_id="run-1", round=3, task_id="t-3-edge-1"),
    ErrorReply(code=ErrorCode.MODEL_MISMATCH, reason="base model differs", task_id="t1"),
    Bye(reason="shutdown"),
]


@pytest.mark.parametrize("message", ALL, ids=lambda m: m.type)
def test_every_message_round_trips(message: object) -> None:
    frames = encode(message, {"update": b"\x01\x02\x03"} if message.type != "error" else None)
    decoded = decode(frames)
    if message.type == "error":
        assert decoded.header == message
        assert decoded.blobs == {}
    else:
        assert decoded.header.model_dump(exclude={"blobs"}) == message.model_dump(exclude={"blobs"})
        assert bytes(decoded.blobs["update"]) == b"\x01\x02\x03"
        assert decoded.header.blobs[0].sha256 == hashlib.sha256(b"\x01\x02\x03").hexdigest()
    assert decoded.nbytes == sum(len(bytes(f)) for f in frames)


def _frames() -> list[bytes]:
    return [bytes(f) for f in encode(ALL[4], {"a": b"x" * 100, "b": b"y" * 7})]


def test_bad_signature() -> None:
    frames = _frames()
    frames[0] = b"EFED/9"
    with pytest.raises(BadSignature):
        decode(frames)


def test_oversized_header() -> None:
    frames = _frames()
    frames[1] = frames[1] + b" " * MAX_HEADER
    with pytest.raises(HeaderTooLarge):
        decode(frames)


@pytest.mark.parametrize("cut", [1, 3])
def test_wrong_frame_count(cut: int) -> None:
    frames = _frames()
    bad = frames[:-1] if cut == 1 else [*frames, b"extra"]
    with pytest.raises(FrameCountMismatch):
        decode(bad)


def test_wrong_blob_length() -> None:
    frames = _frames()
    frames[2] = frames[2] + b"x"
    with pytest.raises(BlobLengthMismatch):
        decode(frames)


def test_wrong_blob_hash() -> None:
    frames = _frames()
    frames[3] = b"z" * 7
    with pytest.raises(BlobHashMismatch):
        decode(frames)


def _header_with(**change: object) -> bytes:
    raw = json.loads(_frames()[1])
    raw.update(change)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"type": "launch_missiles"}, "top"),
        ({"extra": 1}, "extra"),
        ({"num_examples": "64"}, "num_examples"),
        ({"round": -1}, "round"),
        ({"agent_id": "a" * 65}, "agent_id"),
        ({"agent_id": "bad id/../"}, "agent_id"),
        ({"metrics": {"loss": float("nan")}}, "metrics"),
        ({"metrics": {"loss": float("inf")}}, "metrics"),
    ],
)
def test_invalid_headers_rejected(change: dict[str, object], where: str) -> None:
    frames = _frames()
    frames[1] = _header_with(**change)
    with pytest.raises(BadHeader, match=where):
        decode(frames)


def test_non_json_header() -> None:
    with pytest.raises(BadHeader, match="Invalid JSON"):
        parse_header(b"{not json")


def test_messages_are_frozen_and_strict() -> None:
    with pytest.raises(Exception, match="frozen"):
        ALL[0].agent_id = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Heartbeat(round="3")  # type: ignore[arg-type]


def test_error_reply_carries_no_blobs() -> None:
    frames = encode(ErrorReply(code=ErrorCode.INTERNAL, reason="x"))
    raw = json.loads(frames[1])
    raw["blobs"] = [{"name": "a", "nbytes": 1, "sha256": SHA}]
    with pytest.raises(BadHeader, match="no blobs"):
        decode([SIGNATURE, json.dumps(raw).encode(), b"a"])


def test_params_must_be_bounded() -> None:
    with pytest.raises(ValueError, match="exceed"):
        TaskAssign(
            task_id="t",
            method="fedit",
            model=BaseModelRef(name="m", sha256=SHA),
            params={"x": "y" * 70_000},
        )


def test_version_negotiation() -> None:
    assert negotiate([1, 2], PROTOCOL_VERSIONS) == 1
    with pytest.raises(VersionMismatch) as info:
        negotiate([7], PROTOCOL_VERSIONS)
    assert info.value.code == ErrorCode.VERSION_MISMATCH


def test_capture_round_trip(tmp_path: Path) -> None:
    frames = _frames()
    path = tmp_path / "msg.efed"
    save_message(path, frames)
    assert load_message(path) == frames
    assert decode(load_message(path)).header.type == "task_result"


def test_header_is_compact_json() -> None:
    head = dump_header(ALL[2])
    assert b" " not in head
    assert json.loads(head)["type"] == "heartbeat"


def test_a_large_immutable_blob_is_hashed_once_per_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same emulator bundle sent to many agents is hashed once; equal bytes in another
    object, a mutable buffer, or a small blob are hashed each time; and an object nobody holds
    any more leaves the cache."""
    import hashlib
    import types

    import protocol.frames as frames

    calls: list[int] = []

    def sha256(data: object) -> object:
        calls.append(memoryview(data).nbytes)  # type: ignore[arg-type]
        return hashlib.sha256(data)  # type: ignore[arg-type]

    monkeypatch.setattr(frames, "hashlib", types.SimpleNamespace(sha256=sha256))
    big = bytes(range(256)) * (2 * frames.HASH_ONCE_BYTES // 256)
    want = hashlib.sha256(big).hexdigest()
    assert frames.blob_sha256(big) == frames.blob_sha256(big) == want and len(calls) == 1
    part = memoryview(big)[: frames.HASH_ONCE_BYTES]  # a bundle part: a view of the bundle
    assert frames.blob_sha256(part) == frames.blob_sha256(part) and len(calls) == 2
    assert frames.blob_sha256(bytes(bytearray(big))) == want and len(calls) == 3  # another object
    mutable = bytearray(big)
    frames.blob_sha256(mutable)
    mutable[0] ^= 1  # a mutable buffer may change between sends: never cached
    assert frames.blob_sha256(mutable) != want and len(calls) == 5
    frames.blob_sha256(b"small")
    frames.blob_sha256(b"small")
    assert len(calls) == 7
    gone = bytes(bytearray(big))
    frames.blob_sha256(gone)
    key = id(gone)
    assert key in frames._hashes
    del gone  # now only the cache holds it
    frames.blob_sha256(bytes(bytearray(big)))  # adding another prunes what only the cache held
    assert key not in frames._hashes and id(big) in frames._hashes
