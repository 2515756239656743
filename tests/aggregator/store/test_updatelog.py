"""A round's update log: appends on the appender thread, one sync, slices read back."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from aggregator.errors import DiskFull
from aggregator.store.updatelog import UpdateLog, read_slice


def appender_threads() -> int:
    return sum(t.name.startswith("update-log") for t in threading.enumerate())


def test_appends_land_at_their_offsets_once_synced_large_ones_via_the_appender(
    tmp_path: Path,
) -> None:
    before = appender_threads()
    log = UpdateLog(tmp_path / "r" / "updates.log")
    payloads = [bytes([i]) * (1000 + 7 * i + (1 << 20) * (i % 2)) for i in range(20)]
    spans = [log.append(p) for p in payloads]
    log.sync()
    assert (tmp_path / "r" / "updates.log").stat().st_size == sum(map(len, payloads))
    for p, (offset, length) in zip(payloads, spans, strict=True):
        assert length == len(p) and read_slice(log.path, offset, length) == p
    log.close()
    assert appender_threads() == before
    again = UpdateLog(log.path)  # a restart appends after what is there
    assert again.append(b"x")[0] == sum(map(len, payloads))
    again.sync()
    again.close()


def test_a_failed_write_leaves_no_half_payload_and_sync_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = UpdateLog(tmp_path / "updates.log")
    log.append(b"a" * 100)
    log.sync()
    real = os.write
    calls = []

    def full(fd: int, data: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            return real(fd, memoryview(data)[:10])  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    log.append(b"b" * (1 << 20))  # large: on the appender thread
    log.append(b"c" * 100)  # queued after the failure: never written
    with pytest.raises(DiskFull):
        log.sync()
    monkeypatch.setattr(os, "write", real)
    assert log.path.read_bytes() == b"a" * 100
    log.close()
