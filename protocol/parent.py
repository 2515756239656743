"""Child processes that die with the process that started them.

``edgefed-aggregator local`` starts its agents (and regions) as child processes and stops them on
every exit it gets to run code for; a SIGKILL or an abort of ``local`` itself runs nothing, and
its agents would go on reconnecting to a dead address for ever. So ``local`` marks their
environment with its pid, and a marked child asks the kernel (Linux ``PR_SET_PDEATHSIG``) for a
SIGTERM, which the daemons handle as a clean stop, the moment that parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "EDGEFED_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """This process's environment, marked so that a child calling :func:`die_with_parent` stops
    when this process dies. Spawn from a thread that lives as long as the process: the kernel
    ties the signal to the spawning thread."""
    return {**os.environ, ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """In a child started with :func:`child_env`: get SIGTERM when that parent dies (also if it
    already has). Returns whether the request was made; unmarked processes and non-Linux systems
    are left alone."""
    marked = os.environ.pop(ENV, None)
    if not marked or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(marked):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
