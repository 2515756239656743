"""Crash injection for the kill-at-every-point tests: the aggregator SIGKILLs itself at a named
point of a round when the environment asks for it.

``EDGEFED_CRASH_AT=POINT@ROUND`` (unset in production: every call is then one dict lookup).
The points, in the order a training round reaches them:

``assign``    the round is begun in the ledger; its TaskAssigns are not sent yet
``training``  an assigned agent reports progress on its task (it is mid-training)
``upload``    a TaskResult arrived; nothing of it is stored yet
``group``     inside a group commit: the group's records (ledger rows and payloads) are
              written to the round's update log and synced, its ledger transaction has not
              run, no Ack is sent (a restart rebuilds the rows from the log; the agents send
              the updates again, are acknowledged, and each counts once)
``stored``    the update is stored and in the ledger; its Ack is not sent yet
``acked``     the first Ack of the round went out a while ago (one heartbeat interval, or
              until the next result arrives, whichever comes first); the round is still open
``commit``    the round's checkpoint is written; the ledger commit is not

The kill is a real ``SIGKILL``: no ``finally``, no flush, exactly what a power cut leaves.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

ENV = "EDGEFED_CRASH_AT"
POINTS = ("assign", "training", "upload", "group", "stored", "acked", "commit")

_later: dict[str, float] = {}


def _armed(point: str, round: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    name, _, at = spec.partition("@")
    return name == point and (not at or at == str(round))


def reached(point: str, round: int) -> None:
    """Die here if ``EDGEFED_CRASH_AT`` names this point (and round)."""
    if _armed(point, round):
        _die(point, round)


def reached_after(point: str, round: int, delay_s: float) -> None:
    """Die ``delay_s`` from now (checked by :func:`poll`) if the environment names this point."""
    if _armed(point, round) and point not in _later:
        _later[point] = time.monotonic() + delay_s
        _later[f"{point}@round"] = float(round)


def poll(open_round: int | None, *, now: bool = False) -> None:
    """Die if a point armed by :func:`reached_after` is due (``now``: due at once) and its
    round is still the open one."""
    for point, due in list(_later.items()):
        if "@" in point:
            continue
        round = int(_later[f"{point}@round"])
        if round == open_round and (now or time.monotonic() >= due):
            _die(point, round)


def _die(point: str, round: int) -> None:
    log.critical("crash injection: SIGKILL at %s of round %d (%s)", point, round, ENV)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
