"""Outbox files are private to the agent's user (0600, directory 0700) whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edge_agent.daemon.outbox import Outbox
from protocol.frames import encode
from protocol.messages import TaskResult


def test_outbox_files_are_0600_and_its_directory_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a login shell's usual umask: files would be 0644
    try:
        directory = tmp_path / "outbox"
        directory.mkdir(mode=0o755)  # made earlier by someone else, world-readable
        header = TaskResult(task_id="t-1", agent_id="edge-1", method="fedit", num_examples=7)
        with Outbox(directory) as box:
            box.put("t-1", encode(header, {"update": b"secret weights"}))
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    stored = [p for p in directory.iterdir() if p.name.endswith(".msg") or "t-1" in p.name]
    assert stored
    for path in stored:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
