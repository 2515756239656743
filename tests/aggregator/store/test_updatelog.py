"""A round's update log: records (row + payload) appended on the appender thread, one sync,
payloads read back by offset, the records scanned back, a torn tail cut off."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.errors import DiskFull
from aggregator.store.updatelog import ALIGN, UpdateLog, read_slice, scan, truncate


def appender_threads() -> int:
    return sum(t.name.startswith("update-log") for t in threading.enumerate())


def row(i: int) -> dict[str, object]:
    return {"task_id": f"t{i}", "n": i, "metrics": {"loss": 0.5 * i}}


@pytest.mark.parametrize("direct", [True, False])
def test_records_land_at_their_offsets_once_synced_large_ones_via_the_appender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setattr(UpdateLog, "direct", direct)
    before = appender_threads()
    log = UpdateLog(tmp_path / "r" / "update-records.log")
    payloads = [bytes([i]) * (1000 + 7 * i + (1 << 20) * (i % 2)) for i in range(20)]
    payloads[3] = b""  # a row without a payload
    spans = [log.append(row(i), p) for i, p in enumerate(payloads)]
    assert appender_threads() == before + 1  # the large ones went to the appender
    log.sync()
    size = log.path.stat().st_size
    assert size == log.end == -(-(spans[-1][0] + spans[-1][1]) // ALIGN) * ALIGN
    for p, (offset, length) in zip(payloads, spans, strict=True):
        assert length == len(p) and read_slice(log.path, offset, length) == p
    records, end = scan(log.path)
    assert end == size
    assert [r.row for r in records] == [row(i) for i in range(20)]
    assert [(r.offset, r.length) for r in records] == spans
    assert all(r.start % ALIGN == 0 for r in records)  # each record on a block boundary
    log.close()
    assert appender_threads() == before
    again = UpdateLog(log.path)  # a restart appends after what is there
    assert again.append(row(20), b"x")[0] > size
    again.sync()
    again.close()
    assert len(scan(log.path)[0]) == 21


@pytest.mark.parametrize("cut", [1, 19, 25, -1])
def test_a_record_cut_short_ends_the_scan_and_opening_the_log_cuts_it_off(
    tmp_path: Path, cut: int
) -> None:
    """A crash in the middle of a group's writes (before its sync: never acknowledged)."""
    path = tmp_path / "update-records.log"
    log = UpdateLog(path)
    log.append(row(0), b"a" * 100)
    log.sync()
    whole = path.stat().st_size
    log.append(row(1), b"b" * 100)
    log.sync()
    log.close()
    second = scan(path)[0][1]
    with open(path, "r+b") as f:  # the second record: header, row or payload cut short
        f.truncate(whole + cut if cut > 0 else second.end + cut)
    records, end = scan(path)
    assert [r.row for r in records] == [row(0)] and end == whole
    reopened = UpdateLog(path)
    assert path.stat().st_size == whole  # cut off: a new record goes where the torn one began
    offset, _ = reopened.append(row(2), b"c" * 10)
    reopened.sync()
    reopened.close()
    assert [r.row for r in scan(path)[0]] == [row(0), row(2)]
    assert read_slice(path, offset, 10) == b"c" * 10


def test_a_damaged_record_header_ends_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "update-records.log"
    log = UpdateLog(path)
    spans = [log.append(row(i), b"p" * 50) for i in range(3)]
    log.sync()
    log.close()
    with open(path, "r+b") as f:  # one byte of the second record's row changed: its crc fails
        f.seek(spans[1][0] - 3)
        f.write(b"#")
    records, end = scan(path)
    assert [r.row for r in records] == [row(0)] and end == ALIGN  # the first, padded
    truncate(path, end)
    assert path.stat().st_size == end
    assert scan(tmp_path / "missing.log") == ([], 0)


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_write_leaves_no_half_record_and_sync_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setattr(UpdateLog, "direct", direct)
    log = UpdateLog(tmp_path / "update-records.log")
    log.append(row(0), b"a" * 100)
    log.sync()
    good = log.path.read_bytes()
    calls = []

    def full(write: Callable[..., int]) -> Callable[..., int]:
        def partly(fd: int, data: Any, offset: int) -> int:
            calls.append(1)
            if len(calls) == 1:  # a short write of one block, then the disk is full
                first = data[0] if isinstance(data, list) else data
                return os.pwrite(fd, bytes(memoryview(first)[:ALIGN]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")

        return partly

    monkeypatch.setattr(os, "pwritev", full(os.pwritev))
    monkeypatch.setattr(os, "pwrite", full(os.pwrite))
    log.append(row(1), b"b" * (1 << 20))  # large: on the appender thread
    log.append(row(2), b"c" * 100)  # queued after the failure: never written
    with pytest.raises(DiskFull):
        log.sync()
    monkeypatch.undo()
    assert log.path.read_bytes() == good
    log.close()


def test_large_records_bypass_the_page_cache_where_the_file_system_allows(
    tmp_path: Path,
) -> None:
    log = UpdateLog(tmp_path / "update-records.log")
    if log._direct_fd < 0:
        log.close()
        pytest.skip("this file system refuses O_DIRECT")
    flags = fcntl.fcntl(log._direct_fd, fcntl.F_GETFL)
    assert flags & os.O_DIRECT
    payload = bytes(range(256)) * 5000  # 1.28 MB: a direct write
    offset, length = log.append(row(0), payload)
    log.sync()
    log.close()
    assert read_slice(log.path, offset, length) == payload


def test_a_direct_write_the_file_system_refuses_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = UpdateLog(tmp_path / "update-records.log")
    if log._direct_fd < 0:
        log.close()
        pytest.skip("this file system refuses O_DIRECT")
    real = os.pwrite

    def refuse(fd: int, data: Any, offset: int) -> int:
        if fd == log._direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse)
    payload = b"d" * (1 << 20)
    offset, length = log.append(row(0), payload)
    log.sync()
    assert log._direct_fd < 0
    log.close()
    assert read_slice(log.path, offset, length) == payload
    assert [r.row for r in scan(log.path)[0]] == [row(0)]


def test_a_sync_started_ahead_covers_the_appends_before_it_and_raises_what_sync_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = UpdateLog(tmp_path / "update-records.log")
    synced: list[int] = []  # the file's size at each fdatasync
    real = os.fdatasync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_size), real(fd))[1]
    )
    first = [log.append(row(i), bytes([i]) * (1 << 20)) for i in range(2)]  # via the appender
    covered = log.end
    ahead = log.sync_async()
    later = log.append(row(2), b"small")  # appended while the sync may still run
    ahead.result()
    assert synced and synced[0] >= covered  # the sync came after the appends before it
    for i, (offset, length) in enumerate(first):
        assert read_slice(log.path, offset, length) == bytes([i]) * (1 << 20)
    log.sync()  # the later append: durable at the next sync
    assert read_slice(log.path, *later) == b"small"
    assert len(synced) == 2

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", failing)
    log.append(row(3), b"d" * 100)
    failed = log.sync_async()
    with pytest.raises(DiskFull):
        failed.result()
    with pytest.raises(DiskFull):  # a sync after it does not report the log durable
        log.sync()
    monkeypatch.undo()
    log.close()
