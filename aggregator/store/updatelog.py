"""A round's update log: one record per accepted update, synced once per group.

The intake appends a record for every update of a group to the open round's log
(``updates/<run>/round-NNNNNN/update-records.log``), syncs the log once (``fdatasync``), then
records the group's ledger rows in one transaction that does not sync, and only then sends the
Acks. The log's sync is the one durable point of a group: each record holds the update's ledger
row as well as its payload, so a ledger transaction that a power cut loses (SQLite's WAL is
synced at the next synced write, not at this one) is rebuilt from the log when the service
starts (:func:`scan`, used by ``ResultIntake.recover``). The writes happen on an appender thread
(``os.pwrite`` and numpy's copy release the GIL), so the loop validates the next update of the
group while the last one is written; :meth:`UpdateLog.sync` waits for them, and
:meth:`UpdateLog.sync_async` queues the sync behind them on the same thread (the loop takes the
next group meanwhile). A ledger row names
its payload by ``(blob_path, blob_offset, blob_length)``; the sha256 in the row is checked when
the payload is read back.

A record is ``MAGIC, row length (u32), payload length (u64), crc32 (u32)`` (20 bytes,
little-endian; the crc covers the two lengths and the row), the row as JSON, then the payload;
every record begins at a multiple of :data:`ALIGN` (the bytes between records are padding). So a
large record can be written with ``O_DIRECT`` from an aligned buffer: measured on the 2-core
development VM, a buffered 16 MB write took 37-50 ms and the sync of eight of them 62-77 ms, a
direct one 10-15 ms and that sync 2-7 ms (on this VM the page cache path is the cost). Small
records (Ferret's) are written through the page cache; a file system that refuses ``O_DIRECT``
(tmpfs: at the open; any other: at its first direct write) gets buffered writes.

Records of a group that a crash interrupted before its sync may be cut short (or, after a power
cut, hold bytes that were never written): :func:`scan` stops at the first record that is not
whole, and ``ResultIntake.recover`` at the first whose payload does not match its sha256; the log
is cut there (:func:`truncate`) before anything is appended. Those updates were never
acknowledged: their agents send them again. The log goes with its round's folder once the round
is committed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.store.checkpoint import write_error

__all__ = ["LOG_NAME", "LoggedRecord", "UpdateLog", "read_slice", "scan", "truncate"]

LOG_NAME = "update-records.log"
"""The log's file name in a round's folder (``updates.log``, raw payloads whose ledger rows were
synced one by one, is what an earlier version wrote: still read through the rows that name it)."""
MAGIC = b"EFU1"
_HEAD = struct.Struct("<4sIQI")
MAX_ROW_BYTES = 1 << 20
"""A longer row in a record's header is not a record (a torn or foreign file)."""
APPEND_MIN_BYTES = 1 << 20
"""A smaller payload is written on the caller's thread (when nothing is queued before it); a
payload of this size or more is written on the appender thread, with ``O_DIRECT`` where the file
system allows it."""
ALIGN = 4096
"""Records begin at multiples of this: the block size ``O_DIRECT`` needs for offsets, lengths
and buffers."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _crc(row_len: int, payload_len: int, row: bytes) -> int:
    return zlib.crc32(row, zlib.crc32(struct.pack("<IQ", row_len, payload_len)))


def encode_head(row: dict[str, Any], payload_len: int) -> bytes:
    """A record's header and row, to be followed by ``payload_len`` bytes of payload."""
    text = json.dumps(row, allow_nan=False, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, len(text), payload_len, _crc(len(text), payload_len, text)) + text


@dataclass(frozen=True)
class LoggedRecord:
    """One whole record of a log, as :func:`scan` found it."""

    start: int
    """Where the record begins (cut the log here to drop it and everything after it)."""
    row: dict[str, Any]
    offset: int
    """Where its payload begins."""
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def scan(path: Path) -> tuple[list[LoggedRecord], int]:
    """The whole records of the log at ``path`` in order, and where the last one ends, its
    padding included (the log's size when nothing is cut short). A missing file has none."""
    records: list[LoggedRecord] = []
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return records, 0
    with f:
        size = os.fstat(f.fileno()).st_size
        position = 0
        while position + _HEAD.size <= size:  # the next record begins at ``position``
            f.seek(position)
            magic, row_len, payload_len, crc = _HEAD.unpack(f.read(_HEAD.size))
            body = position + _HEAD.size
            if magic != MAGIC or row_len > MAX_ROW_BYTES or body + row_len + payload_len > size:
                break
            text = f.read(row_len)
            if len(text) != row_len or _crc(row_len, payload_len, text) != crc:
                break
            try:
                row = json.loads(text)
            except ValueError:
                break
            if not isinstance(row, dict):
                break
            records.append(LoggedRecord(position, row, body + row_len, payload_len))
            position = _aligned(body + row_len + payload_len)
    return records, (min(_aligned(records[-1].end), size) if records else 0)


def truncate(path: Path, end: int) -> None:
    """Cut the log at ``path`` to ``end`` bytes (and sync it): what follows was never
    acknowledged."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, end)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(f"cannot cut the update log {path}", e) from e


class UpdateLog:
    """One open round's append-only record file (a single writer: the service's loop)."""

    appender = True
    """Write on the appender thread (False: in :meth:`append` itself; the benchmark compares)."""

    direct = True
    """Write large records with ``O_DIRECT`` where the file system allows it (False: through
    the page cache; the benchmark compares)."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the log; a record at its end that is not whole is cut off."""
        self.path = Path(path)
        created = not self.path.exists()
        self._direct_fd = -1
        self._buffer: mmap.mmap | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not created:
                _, end = scan(self.path)
                if end != self.path.stat().st_size:
                    truncate(self.path, end)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            self.end = _aligned(os.fstat(self._fd).st_size)
            if self.direct and hasattr(os, "O_DIRECT"):
                try:
                    self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs)
                        raise
            if created:  # the new file's name must survive a crash too: sync its folder once
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as e:
            raise write_error(f"cannot open the update log {self.path}", e) from e
        self.dirty = False
        self._pool: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []
        self._syncing: list[Future[None]] = []
        """Syncs started by :meth:`sync_async` (the done ones are dropped as more start)."""
        self._failed: OSError | None = None

    def append(self, row: dict[str, Any], data: bytes | memoryview = b"") -> tuple[int, int]:
        """Queue a record of ``row`` (a ledger row as JSON) and its payload ``data``; the
        payload's (offset, length) in the log. Not durable, nor even written, until :meth:`sync`
        returns. Single writer: the offsets are the order of the calls, and the appender writes
        in that order."""
        view = memoryview(data).cast("B")
        head = encode_head(row, len(view))
        start = self.end
        offset = start + len(head)
        self.end = _aligned(offset + len(view))
        self.dirty = True
        if not self.appender or (len(view) < APPEND_MIN_BYTES and not self._writes):
            self._write(head, view, start)  # small: cheaper than the hand-off to the thread
            return offset, len(view)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-log")
        self._writes.append(self._pool.submit(self._write, head, view, start))
        return offset, len(view)

    def _write(self, head: bytes, view: memoryview, start: int) -> None:
        """On the appender thread (or the caller's, when small): the whole record at ``start``
        (aligned), its padding included."""
        if self._failed is not None:
            return  # after a failed write nothing more goes in (sync raises the failure)
        size = len(head) + len(view)
        try:
            if self._direct_fd >= 0 and len(view) >= APPEND_MIN_BYTES:
                try:
                    self._write_direct(head, view, start)
                    return
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    os.close(self._direct_fd)  # refused here after all: buffered from now on
                    self._direct_fd = -1
            parts = [memoryview(head), view, memoryview(bytes(_aligned(size) - size))]
            position = start
            while parts:
                written = os.pwritev(self._fd, parts, position)
                position += written
                while parts and written >= len(parts[0]):
                    written -= len(parts[0])
                    parts.pop(0)
                if parts:
                    parts[0] = parts[0][written:]
        except OSError as e:
            with contextlib.suppress(OSError):  # leave no half record behind
                os.ftruncate(self._fd, start)
            self._failed = e

    def _write_direct(self, head: bytes, view: memoryview, start: int) -> None:
        """The record copied into an aligned buffer (reused), written past the page cache."""
        size = _aligned(len(head) + len(view))
        if self._buffer is None or len(self._buffer) < size:
            if self._buffer is not None:
                with contextlib.suppress(BufferError):
                    self._buffer.close()
            self._buffer = mmap.mmap(-1, size)  # page-aligned
        buffer = memoryview(self._buffer)
        try:
            body = len(head) + len(view)
            buffer[: len(head)] = head
            # numpy's copy releases the GIL (a memoryview's does not): the loop runs meanwhile
            target = np.frombuffer(buffer, np.uint8, len(view), len(head))
            np.copyto(target, np.frombuffer(view, np.uint8))
            del target
            buffer[body:size] = bytes(size - body)
            written = 0
            while written < size:  # a short direct write stops at a block boundary
                written += os.pwrite(self._direct_fd, buffer[written:size], start + written)
        finally:
            buffer.release()

    def sync_async(self) -> Future[None]:
        """:meth:`sync` on the appender thread, after the appends queued so far: the future is
        done once they (and those written before) are durable, and raises what :meth:`sync`
        would. Appends may go on meanwhile; they are durable only at a later sync. Without the
        appender thread (``appender`` False) the sync happens here, and the future is done."""
        if not self.appender:
            done: Future[None] = Future()
            try:
                self.sync()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)
            return done
        writes, self._writes = self._writes, []
        dirty, self.dirty = self.dirty, False
        self._syncing = [f for f in self._syncing if not f.done() or f.exception() is not None]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-log")
        syncing = self._pool.submit(self._sync_after, writes, dirty)
        self._syncing.append(syncing)
        return syncing

    def _sync_after(self, writes: list[Future[None]], dirty: bool) -> None:
        """On the appender thread: ``writes`` are done already (they were queued first)."""
        for write in writes:
            write.result()
        if self._failed is not None:
            raise write_error(f"cannot write to the update log {self.path}", self._failed)
        if not dirty:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise write_error(f"cannot sync the update log {self.path}", e) from e

    def sync(self) -> None:
        """Wait for the queued appends, then make them durable (one ``fdatasync``; and wait for
        any :meth:`sync_async` under way, raising its failure)."""
        writes, self._writes = self._writes, []
        syncing, self._syncing = self._syncing, []
        for write in writes + syncing:
            write.result()
        if self._failed is not None:
            raise write_error(f"cannot write to the update log {self.path}", self._failed)
        if not self.dirty:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise write_error(f"cannot sync the update log {self.path}", e) from e
        self.dirty = False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # a failed write's traceback holds a view
                self._buffer.close()
            self._buffer = None


def read_slice(path: Path, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset`` of a log (fewer if the file is shorter)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
