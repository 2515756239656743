"""The durable outbox: order, idempotence, exclusive use, and crashes in the middle of a put."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_agent.daemon.outbox import Outbox, OutboxError
from protocol.frames import decode, encode
from protocol.messages import TaskResult

ROOT = Path(__file__).resolve().parents[3]


def result_frames(task_id: str, payload: bytes = b"") -> list:
    header = TaskResult(task_id=task_id, agent_id="edge-1", method="fedit", num_examples=7)
    return encode(header, {"update": payload} if payload else None)


def test_put_then_pending_returns_the_exact_frames_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox") as box:
        box.put("t-1", result_frames("t-1", b"\x01" * 1000))
        box.put("t-2", result_frames("t-2"))
        box.put("t-3", result_frames("t-3", b"abc"))
        pending = box.pending()
    assert [task_id for task_id, _ in pending] == ["t-1", "t-2", "t-3"]
    first = decode(pending[0][1])
    assert first.header.type == "task_result"
    assert first.header.task_id == "t-1"
    assert bytes(first.blobs["update"]) == b"\x01" * 1000
    assert bytes(decode(pending[2][1]).blobs["update"]) == b"abc"


def test_entries_survive_reopen_and_sequence_keeps_increasing(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    with Outbox(directory) as box:
        for task_id in ("a", "b", "c"):
            box.put(task_id, result_frames(task_id))
        assert box.remove("c") is True
        assert box.remove("c") is False
        assert box.has("a") and not box.has("c")
    assert sorted(p.name for p in directory.glob("*.efed")) == [
        "0000000001-a.efed",
        "0000000002-b.efed",
    ]
    with Outbox(directory) as box:
        assert [t for t, _ in box.pending()] == ["a", "b"]
        box.put("d", result_frames("d"))
        # "c" used seq 3 and was removed; the highest seq on disk is 2, so "d" takes 3.
        assert (directory / "0000000003-d.efed").is_file()
        box.remove("a")
        box.put("e", result_frames("e"))
        assert [t for t, _ in box.pending()] == ["b", "d", "e"]
        assert len(box) == 3


def test_put_is_idempotent_per_task_id(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox") as box:
        box.put("t-1", result_frames("t-1", b"first"))
        box.put("t-1", result_frames("t-1", b"second"))
        pending = box.pending()
        assert len(pending) == 1
        assert bytes(decode(pending[0][1]).blobs["update"]) == b"first"
        frames = box.get("t-1")
        assert frames is not None and bytes(decode(frames).blobs["update"]) == b"first"
        assert box.get("nope") is None


def test_invalid_task_id_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox") as box, pytest.raises(ValueError, match="invalid task id"):
        box.put("../escape", result_frames("t"))


def test_second_outbox_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with (
        Outbox(tmp_path / "outbox"),
        pytest.raises(OutboxError, match="in use by another edgefed agent"),
    ):
        Outbox(tmp_path / "outbox")
    Outbox(tmp_path / "outbox").close()  # released on close


def test_corrupt_entry_is_moved_aside(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    with Outbox(directory) as box:
        box.put("good", result_frames("good"))
        box.put("bad", result_frames("bad"))
    bad = directory / "0000000002-bad.efed"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated by a disk fault, not by put()
    with Outbox(directory) as box:
        assert [t for t, _ in box.pending()] == ["good"]
        assert not box.has("bad")
    assert (directory / "0000000002-bad.efed.corrupt").is_file()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge_agent.daemon.outbox import Outbox
    from protocol.frames import encode
    from protocol.messages import TaskResult

    directory, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class Stall:
        # A frame whose bytes never finish arriving: the put is cut while writing.
        @property
        def buffer(self):
            marker.write_text("writing")
            time.sleep(60)
            return memoryview(b"")

    box = Outbox(directory)
    header = TaskResult(task_id="done", agent_id="edge-1", method="fedit", num_examples=3)
    box.put("done", encode(header, {"update": b"x" * 4096}))
    frames = encode(header.model_copy(update={"task_id": "cut"}), {"update": b"y" * (256 << 10)})
    box.put("cut", [*frames, Stall()])
    """
)


def test_sigkill_in_the_middle_of_a_put_leaves_only_whole_entries(tmp_path: Path) -> None:
    directory, marker = tmp_path / "outbox", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert child.poll() is None, "child exited early"
            assert time.monotonic() < deadline, "child never started writing"
            time.sleep(0.02)
        temps = list(directory.glob(".tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # half-written, on disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    with Outbox(directory) as box:
        pending = box.pending()
        assert [t for t, _ in pending] == ["done"]
        assert bytes(decode(pending[0][1]).blobs["update"]) == b"x" * 4096
        assert not box.has("cut")
        box.put("next", result_frames("next"))
        assert [t for t, _ in box.pending()] == ["done", "next"]
    assert list(directory.glob(".tmp-*")) == []
