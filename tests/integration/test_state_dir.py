"""The state directory on a read-only or full file system, against a real ``serve`` (issue 24).

A read-only state dir once ended in a misleading "corrupt ledger" (or SIGBUS): now one clear
line and exit code 2 (someone must fix the mount). The test mounts a small tmpfs and remounts it
read-only; it is skipped where mounting is not permitted. (A full disk: tests/aggregator/
test_disk_full.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import SHA, toml_text


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                        check=False, capture_output=True).returncode  # fmt: skip
    if rc != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def serve(tmp_path: Path, state: Path) -> subprocess.Popen[bytes]:
    config = tmp_path / "aggregator.toml"
    config.write_text(toml_text({
        "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(state)},
        "security": {"insecure": True},
        "run": {"model_sha256": SHA, "min_agents": 50},
    }), encoding="utf-8")  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_a_read_only_state_dir_is_one_clear_error(tmp_path: Path, tmpfs: Path) -> None:
    state = tmpfs / "state"
    state.mkdir()
    (state / "ledger.sqlite").write_bytes(b"")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = serve(tmp_path, state)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert b"is not writable" in out and b"corrupt" not in out
