"""A round's update log: accepted update payloads appended to one file, synced once per group.

The intake appends every payload of a group of updates to the open round's log
(``updates/<run>/round-NNNNNN/updates.log``), syncs the log once (``fdatasync``) and only then
records the group's ledger rows (one transaction) and sends the Acks. The writes happen on an
appender thread (``os.write`` releases the GIL), so the loop validates the next update of the
group while the last one is written; :meth:`UpdateLog.sync` waits for them. A ledger row names its
payload by ``(blob_path, blob_offset, blob_length)``; the sha256 in the row is checked when the
payload is read back.

Bytes in the log that no ledger row names are the payloads of a group that a crash interrupted
before its ledger transaction: they were never acknowledged, the agents send them again, and
they are never read (a new append goes after them). The log goes with its round's folder once
the round is committed.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from aggregator.store.checkpoint import write_error

__all__ = ["UpdateLog", "read_slice"]

LOG_NAME = "updates.log"
APPEND_MIN_BYTES = 1 << 20
"""A smaller payload is written on the caller's thread (when nothing is queued before it)."""


class UpdateLog:
    """One open round's append-only payload file (a single writer: the service's loop)."""

    appender = True
    """Write on the appender thread (False: in :meth:`append` itself; the benchmark compares)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.end = os.fstat(self._fd).st_size
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
        self._failed: OSError | None = None

    def append(self, data: bytes | memoryview) -> tuple[int, int]:
        """Queue ``data`` for the appender thread; its (offset, length) in the log. Not
        durable, nor even written, until :meth:`sync` returns. Single writer: the offsets are
        the order of the calls, and the appender writes in that order."""
        view = memoryview(data).cast("B")
        offset = self.end
        self.end = offset + len(view)
        self.dirty = True
        if not self.appender or (len(view) < APPEND_MIN_BYTES and not self._writes):
            self._write(view, offset)  # small: cheaper than the hand-off to the thread
            return offset, len(view)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-log")
        self._writes.append(self._pool.submit(self._write, view, offset))
        return offset, len(view)

    def _write(self, view: memoryview, offset: int) -> None:
        """On the appender thread: the whole of ``view`` at the end of the log."""
        if self._failed is not None:
            return  # after a failed write nothing more goes in (sync raises the failure)
        try:
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError as e:
            with contextlib.suppress(OSError):  # leave no half payload behind
                os.ftruncate(self._fd, offset)
            self._failed = e

    def sync(self) -> None:
        """Wait for the queued appends, then make them durable (one ``fdatasync``)."""
        writes, self._writes = self._writes, []
        for write in writes:
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


def read_slice(path: Path, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset`` of a log (fewer if the file is shorter)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
