"""The durable outbox: every finished TaskResult stays on disk until the aggregator Acks it.

Layout of the outbox directory::

    .lock                          held (flock) by the one agent process that uses the directory
    0000000007-t-3-edge-1.efed     one message: sequence number, task id; capture format of
                                   :func:`protocol.frames.save_message` (``EFEDMSG1`` + frames)
    .tmp-0000000008-t-4-edge-1     a message being written; never read, removed on open

:meth:`Outbox.put` writes the temp file, fsyncs it, renames it to its final name and fsyncs the
directory before it returns, so an entry either exists whole or not at all, whatever the crash.
Entries come back from :meth:`Outbox.pending` in the order they were put (sequence numbers keep
increasing across restarts). The class is thread-safe: the worker puts, the link thread reads and
removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from edge_agent.errors import EdgeAgentError
from protocol.errors import FrameError
from protocol.frames import FrameLike, load_message, save_message

logger = logging.getLogger(__name__)

SUFFIX = ".efed"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
_ENTRY = re.compile(r"^(\d{10})-([A-Za-z0-9._:@-]{1,64})\.efed$")
_TASK_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")


class OutboxError(EdgeAgentError):
    """The outbox directory cannot be used (locked by another agent, unwritable...)."""


class Outbox:
    """Durable store of outgoing results, keyed by task id."""

    def __init__(self, directory: Path, *, lock: bool = True) -> None:
        self.directory = Path(directory)
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)  # results are private: owner only, also outside systemd
        except OSError as exc:
            raise OutboxError(
                f"{self.directory}: cannot create the outbox ({exc.strerror or exc})"
            ) from None
        if lock:
            self._lock_fd = _lock(self.directory / LOCK_NAME)
        self._entries: dict[str, Path] = {}
        self._next_seq = 1
        self._scan()

    # ------------------------------------------------------------------------------ public API

    def put(self, task_id: str, frames: Sequence[FrameLike]) -> None:
        """Store ``frames`` under ``task_id`` durably; a task id already present is kept as is."""
        if not _TASK_ID.match(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        with self._mutex:
            if task_id in self._entries:
                logger.debug("outbox already holds %s", task_id)
                return
            seq = self._next_seq
            self._next_seq += 1
            name = f"{seq:010d}-{task_id}{SUFFIX}"
            temp = self.directory / f"{TEMP_PREFIX}{seq:010d}-{task_id}"
            final = self.directory / name
            try:
                save_message(temp, frames)
                os.chmod(temp, 0o600)
                _fsync_path(temp)
                os.replace(temp, final)
                _fsync_path(self.directory)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._entries[task_id] = final
        logger.debug("outbox: stored %s (%d bytes)", name, final.stat().st_size)

    def get(self, task_id: str) -> list[bytes] | None:
        """The stored frames of ``task_id``, or None."""
        with self._mutex:
            path = self._entries.get(task_id)
            if path is None:
                return None
            return self._load(task_id, path)

    def pending(self) -> list[tuple[str, list[bytes]]]:
        """Every stored (task id, frames), oldest first."""
        with self._mutex:
            out: list[tuple[str, list[bytes]]] = []
            for task_id, path in list(self._entries.items()):
                frames = self._load(task_id, path)
                if frames is not None:
                    out.append((task_id, frames))
            return out

    def has(self, task_id: str) -> bool:
        with self._mutex:
            return task_id in self._entries

    def task_ids(self) -> list[str]:
        with self._mutex:
            return list(self._entries)

    def remove(self, task_id: str) -> bool:
        """Delete ``task_id``'s entry durably; False when there was none."""
        with self._mutex:
            path = self._entries.pop(task_id, None)
            if path is None:
                return False
            path.unlink(missing_ok=True)
            _fsync_path(self.directory)
            return True

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)

    def close(self) -> None:
        """Release the directory lock (entries stay on disk)."""
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- internals

    def _scan(self) -> None:
        found: list[tuple[int, str, Path]] = []
        cleaned = 0
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                path.unlink(missing_ok=True)  # an interrupted put: it never existed
                cleaned += 1
                continue
            match = _ENTRY.match(path.name)
            if match:
                found.append((int(match.group(1)), match.group(2), path))
        if cleaned:
            _fsync_path(self.directory)
            logger.info("outbox: removed %d half-written entries", cleaned)
        for seq, task_id, path in sorted(found):
            if task_id in self._entries:  # cannot happen through put(); keep the oldest
                logger.warning("outbox: duplicate entry %s ignored", path.name)
                continue
            self._entries[task_id] = path
            self._next_seq = max(self._next_seq, seq + 1)
        if self._entries:
            logger.info("outbox: %d results waiting for an Ack", len(self._entries))

    def _load(self, task_id: str, path: Path) -> list[bytes] | None:
        try:
            return load_message(path)
        except (OSError, FrameError) as exc:
            # Only disk corruption or a hand edit gets here: put() renames whole files only.
            aside = path.with_name(path.name + ".corrupt")
            logger.error("outbox: %s is unreadable (%s); moved to %s", path.name, exc, aside.name)
            self._entries.pop(task_id, None)
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            return None


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutboxError(
            f"{path.parent} is in use by another edgefed agent; give each agent its own state_dir"
        ) from None
    return fd


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
