"""The state directory's health: writable before anything opens it, and a disk-full exit that a
supervisor restarts once space is back.

- :func:`check_writable` runs before the ledger and the checkpoint store open the directory:
  a read-only directory or file system is one clear :class:`ConfigError` (exit code 2, which
  the shipped unit does not restart: someone has to fix the mount), never a misleading
  "corrupt ledger" or a crash deep inside SQLite.
- A full disk is transient: the service stops with :class:`~aggregator.errors.DiskFull`,
  ``serve`` waits until :data:`MIN_FREE_BYTES` are free on the state directory's file system
  again (logging how much is missing), then exits with :data:`EXIT_DISK_FULL` (75, EX_TEMPFAIL),
  which the unit restarts (it prevents only 2). Waiting first keeps systemd's start limit from
  giving up while the disk is still full.
- :class:`StateDirLock`: one aggregator per state directory. Two would both adopt the same run,
  cut the same update log at start-up, answer each other's admin requests, and count updates
  twice; the second is refused before it opens anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_DISK_FULL = 75
"""``serve``'s exit code after a full disk (EX_TEMPFAIL: try again later)."""
MIN_FREE_BYTES = 256 << 20
"""Free space on the state directory's file system before ``serve`` exits to be restarted
(``EDGEFED_AGGREGATOR_MIN_FREE_MB`` overrides it)."""
POLL_S = 10.0


def check_writable(state_dir: Path) -> None:
    """A :class:`ConfigError` unless ``state_dir`` (and any ledger in it) can be written."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
            path = state_dir / name
            if path.exists():
                with open(path, "r+b"):
                    pass
    except OSError as exc:
        raise ConfigError(
            f"state dir {state_dir} is not writable ({exc.strerror or exc}); the aggregator "
            "records every update and round there: make it writable (or point "
            "server.state_dir elsewhere)"
        ) from None


LOCK_NAME = "aggregator.lock"


class StateDirLock:
    """An exclusive lock on ``state_dir`` for as long as this object lives (or until
    :meth:`release`): a :class:`ConfigError` naming the holder's pid when another process
    holds it. The kernel drops the lock when the process dies, SIGKILL included."""

    def __init__(self, state_dir: Path) -> None:
        path = Path(state_dir) / LOCK_NAME
        self._file = open(path, "a+", encoding="ascii")  # noqa: SIM115 (held for the lifetime)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(
                f"state dir {state_dir} is in use by another aggregator (pid {holder}); stop "
                "it first, or give this one another server.state_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the lock


def wait_for_space(
    state_dir: Path,
    should_stop: Callable[[], bool],
    *,
    need: int | None = None,
    poll_s: float = POLL_S,
) -> None:
    """Block until ``need`` bytes are free where ``state_dir`` lives, or ``should_stop()``."""
    if need is None:
        mb = os.environ.get("EDGEFED_AGGREGATOR_MIN_FREE_MB")
        need = int(float(mb) * (1 << 20)) if mb else MIN_FREE_BYTES
    while not should_stop():
        try:
            free = shutil.disk_usage(state_dir).free
        except OSError:
            return
        if free >= need:
            log.warning("%d MiB free again on %s: exiting to be restarted", free >> 20, state_dir)
            return
        log.error(
            "disk full: %d MiB free on %s, waiting for %d MiB before restarting",
            free >> 20,
            state_dir,
            need >> 20,
        )
        deadline = time.monotonic() + poll_s
        while time.monotonic() < deadline and not should_stop():
            time.sleep(0.2)
