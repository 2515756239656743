"""A child started with ``child_env`` that calls ``die_with_parent`` stops when its parent is
SIGKILLed (``local``'s agents must not outlive it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from protocol.parent import ENV, die_with_parent

CHILD = textwrap.dedent(
    """
    import time
    from protocol.parent import die_with_parent
    print("ready" if die_with_parent() else "unmarked", flush=True)
    time.sleep(120)
    """
)

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from protocol.parent import child_env
    marked = "--marked" in sys.argv
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=child_env() if marked else None,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == ("ready" if marked else "unmarked")
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (reaped by init soon) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def _child_after_parent_killed(marked: bool) -> tuple[int, bool]:
    args = [sys.executable, "-c", PARENT, CHILD] + (["--marked"] if marked else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    return child, alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_marked_child_stops_when_its_parent_is_sigkilled() -> None:
    _, alive = _child_after_parent_killed(marked=True)
    assert not alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_an_unmarked_child_outlives_its_parent() -> None:
    # the control: without the mark nothing ties the child to its parent
    _, alive = _child_after_parent_killed(marked=False)
    assert alive


def test_an_unmarked_process_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert die_with_parent() is False
